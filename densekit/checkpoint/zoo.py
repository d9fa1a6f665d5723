"""Pretrained weights by name: ``weights=zoo:<name>`` downloads a public checkpoint once, checks it, and loads it.

The table (:data:`ZOO`) lists efficientdet-pytorch's (effdet 0.4.1) COCO checkpoints, TF-ported (``tf_*``) and
PyTorch-trained, and torchvision's LR-ASPP MobileNetV3-Large; each names the densekit model config it fits, with the
config keys that make it fit (class count and names, and for the PyTorch-trained EfficientDets their backbone and
padding), the size and the metric it was published with.

Cache: ``$DENSEKIT_CACHE`` when set, else ``<torch.hub.get_dir()>/densekit`` (``~/.cache/torch/hub/densekit``
unless ``$TORCH_HOME`` moves it); a checkpoint lies there under its URL's file name. A download streams into a
temporary file in that folder and is renamed to the final name only once its sha256 starts with the prefix in the
file name (the torch.hub convention), so the cache never holds a partial or wrong file, Ctrl-C included.

Unlike torch.hub, a file already in the cache is hash-checked too, once per process (about a second for the largest,
D7x): the documented offline route is to copy the file there by hand, and a truncated or wrong copy should be named
as such, not fail later as an unpickling error or load as different weights.
"""
from __future__ import annotations

import fnmatch
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ..config import as_overrides
from ..labels import COCO_ID_HEAD, class_names_of
from .io import CheckpointError, atomic_write

#: How ``weights=`` names a zoo entry: ``weights=zoo:tf_efficientdet_d0``.
ZOO_PREFIX = "zoo:"
#: Socket timeout of a download (connect and each read): an unreachable server fails in seconds, never hangs.
DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK = 1 << 20

Layout = Literal["effdet", "torchvision_lraspp"]


def _coco_names() -> list[str]:
    return class_names_of(OmegaConf.create({"name": "COCO", "num_classes": COCO_ID_HEAD}))


def _voc_names() -> list[str]:
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights

    return list(LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])


#: Label sets of the public checkpoints: class count, and the names of labels 0..n-1 (read from torchvision's
#: metadata, no download). ``coco``: label ``i`` is COCO category id ``i + 1``; ``voc``: background + 20 VOC classes.
LABEL_SETS: dict[str, tuple[int, Callable[[], list[str]]]] = {"coco": (COCO_ID_HEAD, _coco_names), "voc": (21, _voc_names)}


@dataclass(frozen=True)
class ZooEntry:
    """One public checkpoint and the densekit model it fits.

    Attributes:
        name: What ``weights=zoo:<name>`` says (the publisher's model name).
        url: Where the file is published (``https://`` or, in tests, ``file://``).
        sha256: The leading hex digits of the file's sha256 (those in its file name, as torch.hub checks them).
        layout: The state_dict layout :func:`~densekit.checkpoint.convert.load_state_dict_any` converts from.
        model: The ``conf/model`` entry to build.
        labels: The label set (:data:`LABEL_SETS`): class count and names.
        image_size: The input size of the published metric, for the docs.
        metric: The published result, e.g. ``"34.2 AP"``.
        metric_source: Where ``metric`` comes from and on what data.
        arch_overrides: Model config keys (nested) besides the classes that the checkpoint needs.
    """

    name: str
    url: str
    sha256: str
    layout: Layout
    model: str
    labels: str
    image_size: str
    metric: str
    metric_source: str
    arch_overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The file name in the cache: the URL's last component, as torch.hub names it."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def num_classes(self) -> int:
        return LABEL_SETS[self.labels][0]

    def class_names(self) -> list[str]:
        return LABEL_SETS[self.labels][1]()

    def model_overrides(self) -> dict[str, Any]:
        """The config keys that make :attr:`model` fit this checkpoint (merge onto ``conf/model/<model>.yaml``)."""
        return {**deepcopy(dict(self.arch_overrides)), "num_classes": self.num_classes, "class_names": self.class_names()}


_EFFDET_URL = "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/"
_EFFDET_SOURCE = "effdet 0.4.1 README, COCO val2017"
_EFFDET_PYTORCH = {"tf_padding": False, "redundant_bias": False}  # effdet's PyTorch-native models: pad_type='', no conv bias before BN
_ADVPROP = {"pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5]}  # AdvProp inputs: [-1, 1]


def _effdet(name: str, model: str, file: str, size: int, ap: float, **arch: Any) -> ZooEntry:
    return ZooEntry(
        name=name, url=_EFFDET_URL + file, sha256=file.rsplit("-", 1)[1].split(".")[0], layout="effdet", model=model,
        labels="coco", image_size=f"{size}x{size}", metric=f"{ap} AP", metric_source=_EFFDET_SOURCE, arch_overrides=arch,
    )


_ENTRIES = [
    _effdet("tf_efficientdet_d0", "efficientdet_d0", "tf_efficientdet_d0_34-f153e0cf.pth", 512, 34.2),
    _effdet("tf_efficientdet_d1", "efficientdet_d1", "tf_efficientdet_d1_40-a30f94af.pth", 640, 40.1),
    _effdet("tf_efficientdet_d2", "efficientdet_d2", "tf_efficientdet_d2_43-8107aa99.pth", 768, 43.4),
    _effdet("tf_efficientdet_d3", "efficientdet_d3", "tf_efficientdet_d3_47-0b525f35.pth", 896, 47.1),
    _effdet("tf_efficientdet_d4", "efficientdet_d4", "tf_efficientdet_d4_49-f56376d9.pth", 1024, 49.2),
    _effdet("tf_efficientdet_d5", "efficientdet_d5", "tf_efficientdet_d5_51-c79f9be6.pth", 1280, 51.2),
    _effdet("tf_efficientdet_d6", "efficientdet_d6", "tf_efficientdet_d6_52-4eda3773.pth", 1280, 52.0),
    _effdet("tf_efficientdet_d7", "efficientdet_d7", "tf_efficientdet_d7_53-6d1d7a95.pth", 1536, 53.1),
    _effdet("tf_efficientdet_d7x", "efficientdet_d7x", "tf_efficientdet_d7x-f390b87c.pth", 1536, 54.3),
    _effdet("tf_efficientdet_d0_ap", "efficientdet_d0", "tf_efficientdet_d0_ap-d0cdbd0a.pth", 512, 34.8, **_ADVPROP),
    _effdet("tf_efficientdet_d1_ap", "efficientdet_d1", "tf_efficientdet_d1_ap-7721d075.pth", 640, 40.8, **_ADVPROP),
    _effdet("tf_efficientdet_d2_ap", "efficientdet_d2", "tf_efficientdet_d2_ap-a2995c19.pth", 768, 44.2, **_ADVPROP),
    _effdet("tf_efficientdet_d3_ap", "efficientdet_d3", "tf_efficientdet_d3_ap-e4a2feab.pth", 896, 47.7, **_ADVPROP),
    _effdet("tf_efficientdet_d4_ap", "efficientdet_d4", "tf_efficientdet_d4_ap-f601a5fc.pth", 1024, 50.2, **_ADVPROP),
    _effdet("tf_efficientdet_d5_ap", "efficientdet_d5", "tf_efficientdet_d5_ap-3673ae5d.pth", 1280, 52.1, **_ADVPROP),
    _effdet("tf_efficientdet_lite0", "efficientdet_lite0", "tf_efficientdet_lite0-dfacfc78.pth", 320, 27.1),
    _effdet("tf_efficientdet_lite1", "efficientdet_lite1", "tf_efficientdet_lite1-6dc7ab30.pth", 384, 32.2),
    _effdet("tf_efficientdet_lite2", "efficientdet_lite2", "tf_efficientdet_lite2-86c5d55b.pth", 448, 35.9),
    _effdet("tf_efficientdet_lite3", "efficientdet_lite3", "tf_efficientdet_lite3-506852cb.pth", 512, 39.6),
    _effdet("tf_efficientdet_lite4", "efficientdet_lite4", "tf_efficientdet_lite4-391ddabc.pth", 640, 44.2),
    _effdet("efficientdet_d0", "efficientdet_d0", "efficientdet_d0-f3276ba8.pth", 512, 33.6,
            backbone={"name": "efficientnet_b0"}, **_EFFDET_PYTORCH),
    _effdet("efficientdet_d1", "efficientdet_d1", "efficientdet_d1-bb7e98fe.pth", 640, 39.4,
            backbone={"name": "efficientnet_b1"}, **_EFFDET_PYTORCH),
    ZooEntry(
        name="lraspp_mobilenet_v3_large_coco_voc",
        url="https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth",
        sha256="d234d4ea",
        layout="torchvision_lraspp",
        model="lraspp_mobilenet_v3_large",
        labels="voc",
        image_size="short side 520",
        metric="57.9 mIoU",
        metric_source="torchvision 0.29 weights metadata (COCO_WITH_VOC_LABELS_V1), COCO val2017 with VOC labels",
    ),
]

#: Every entry by name. Tests add entries with ``file://`` URLs (``monkeypatch.setitem(ZOO, ...)``).
ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def list_weights(pattern: str | None = None, model: str | None = None) -> list[str]:
    """Names that ``weights=zoo:<name>`` accepts, sorted.

    Args:
        pattern: Only names matching this shell-style wildcard, e.g. ``"tf_efficientdet_lite*"``.
        model: Only entries for this densekit model config, e.g. ``"efficientdet_d0"``.
    """
    return sorted(
        name for name, entry in ZOO.items()
        if (pattern is None or fnmatch.fnmatchcase(name, pattern)) and (model is None or entry.model == model)
    )


def is_zoo_ref(weights: object) -> bool:
    """Whether a ``weights=`` value names a zoo entry (``"zoo:<name>"``) rather than a file."""
    return isinstance(weights, str) and weights.startswith(ZOO_PREFIX)


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name`` (with or without the ``zoo:`` prefix).

    Raises:
        CheckpointError: unknown name; the message lists the known ones (closest first).
    """
    name = name.removeprefix(ZOO_PREFIX)
    if name in ZOO:
        return ZOO[name]
    close = get_close_matches(name, list(ZOO), n=3)
    hint = f" Did you mean {', '.join(ZOO_PREFIX + c for c in close)}?" if close else ""
    raise CheckpointError(f"unknown pretrained weights {ZOO_PREFIX}{name}.{hint} Known: {', '.join(list_weights())}")


def cache_dir() -> Path:
    """Where zoo checkpoints are kept: ``$DENSEKIT_CACHE``, else ``<torch.hub.get_dir()>/densekit``."""
    return Path(os.environ.get("DENSEKIT_CACHE") or Path(torch.hub.get_dir()) / "densekit")


def cached_path(entry: ZooEntry) -> Path:
    """The path ``entry``'s file has in the cache (whether or not it is there yet)."""
    return cache_dir() / entry.filename


def _by_hand(entry: ZooEntry, path: Path) -> str:
    return (
        f"\n  The file is expected at {path}. To place it by hand, download {entry.url} where it can be reached "
        f"(e.g. `curl -L -o {entry.filename} {entry.url}`) and copy it to that path "
        f"(the folder is $DENSEKIT_CACHE, default <torch hub dir>/densekit)."
    )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of cache files checked in this process


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _check_cached(entry: ZooEntry, path: Path) -> None:
    key = _file_key(path)
    if key in _verified:
        return
    actual = _sha256_of(path)
    if not actual.startswith(entry.sha256):
        raise CheckpointError(
            f"{ZOO_PREFIX}{entry.name}: the cached file {path} has sha256 {actual[:16]}..., not the expected prefix "
            f"{entry.sha256}: it is truncated or not the file published at {entry.url}. Delete it to download "
            f"again, or replace it with that file." + _by_hand(entry, path)
        )
    _verified.add(key)


def _download(entry: ZooEntry, path: Path, progress: bool) -> None:
    """Stream ``entry.url`` into ``path`` through :func:`atomic_write`: renamed into place only when complete and
    hash-checked; on any failure (Ctrl-C included) the temporary file is removed."""
    def failed(reason: object) -> CheckpointError:
        return CheckpointError(f"{ZOO_PREFIX}{entry.name}: cannot download {entry.url}: {reason}." + _by_hand(entry, path))

    request = urllib.request.Request(entry.url, headers={"User-Agent": "densekit"})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError / HTTPError / timeout / bad URL
        plain_url_error = isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)
        raise failed(err.reason if plain_url_error else err) from None
    if progress:
        sys.stderr.write(f'Downloading: "{entry.url}" to {path}\n')
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    digest, received = hashlib.sha256(), 0
    try:
        with response, atomic_write(path) as f, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, desc=entry.filename
        ) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            if total is not None and received != total:
                raise failed(f"the transfer ended after {received} of {total} bytes")
            actual = digest.hexdigest()
            if not actual.startswith(entry.sha256):
                raise failed(
                    f"the file's sha256 is {actual[:16]}..., not the expected prefix {entry.sha256} "
                    "(nothing was written to the cache)"
                )
    except (OSError, http.client.HTTPException) as err:  # a timeout or reset mid-transfer
        raise failed(err) from None


def fetch(entry: ZooEntry | str, progress: bool = True) -> Path:
    """The local, hash-checked file of a zoo entry, downloaded into :func:`cache_dir` on first use.

    Args:
        entry: A :class:`ZooEntry` or its name (``"tf_efficientdet_d0"`` or ``"zoo:tf_efficientdet_d0"``).
        progress: Show a progress bar while downloading (on stderr).

    Raises:
        CheckpointError: unknown name; download failure (offline, unreachable, HTTP error, timeout after
            :data:`DOWNLOAD_TIMEOUT_S`) or wrong hash, naming the URL, the expected path and how to place the
            file by hand; a cached file with the wrong hash.
    """
    entry = get_entry(entry) if isinstance(entry, str) else entry
    path = cached_path(entry)
    if not path.is_file():
        _download(entry, path, progress)
        _verified.add(_file_key(path))  # hashed while it streamed
    _check_cached(entry, path)
    return path


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The file a ``weights=`` value names: a zoo entry's cached file (downloaded if needed) or the path itself."""
    return fetch(weights) if is_zoo_ref(weights) else Path(weights)


def architecture_overrides(weights: str | os.PathLike | None) -> dict[str, Any]:
    """The model config keys besides the classes that a zoo entry needs (``{}`` for files and ``None``): what a
    fine-tuning run merges onto its model config, whose classes come from its dataset."""
    return deepcopy(dict(get_entry(weights).arch_overrides)) if is_zoo_ref(weights) else {}


def markdown_table() -> str:
    """The docs/models.md table of every entry, in :data:`ZOO` order."""
    rows = [
        "| weights= | densekit model | classes | image size | expected | source | file |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in ZOO.items():
        applied = ", ".join(as_overrides(e.arch_overrides))
        config = f"{e.model}" + (f" ({applied})" if applied else "")
        rows.append(
            f"| `{ZOO_PREFIX}{name}` | {config} | {e.num_classes} ({e.labels}) | {e.image_size} | {e.metric} "
            f"| {e.metric_source} | [{e.filename}]({e.url}) |"
        )
    return "\n".join(rows)

