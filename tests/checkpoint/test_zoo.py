"""``weights=zoo:<name>``: download once into the cache through a local ``file://`` URL, hash check, load, and the
failures a user meets offline (unreachable URL, wrong hash, interrupted download, unknown name); nothing here
touches the network."""
from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest
import torch

effdet = pytest.importorskip("effdet")
from effdet import EfficientDet as EffDet, get_efficientdet_config  # noqa: E402

import densekit  # noqa: E402
from densekit import CheckpointError  # noqa: E402
from densekit.checkpoint import zoo  # noqa: E402
from densekit.checkpoint.weights import read_model_weights  # noqa: E402
from densekit.labels import coco_category_names  # noqa: E402

# A narrow EfficientDet-Lite0 (BiFPN 16 x 1, head 1; the real Lite0 backbone): a real effdet-layout checkpoint of 12 MB.
TINY_ARCH = {"neck": {"channels": 16, "repeats": 1}, "head": {"repeats": 1}}


@pytest.fixture(scope="module")
def effdet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An effdet ``tf_efficientdet_lite0``-layout state_dict (random weights, 90 classes) and its sha256."""
    cfg = get_efficientdet_config("tf_efficientdet_lite0")
    cfg.fpn_channels, cfg.fpn_cell_repeats, cfg.box_class_repeats = 16, 1, 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("published") / "tiny_lite0.pth"
    torch.save(EffDet(cfg, pretrained_backbone=False).state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def add_entry(monkeypatch: pytest.MonkeyPatch, name: str, url: str, sha256: str) -> zoo.ZooEntry:
    entry = zoo.ZooEntry(
        name=name, url=url, sha256=sha256, layout="effdet", model="efficientdet_lite0", labels="coco",
        image_size="320x320", metric="0.0 AP", metric_source="test", arch_overrides=TINY_ARCH,
    )
    monkeypatch.setitem(zoo.ZOO, name, entry)
    return entry


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DENSEKIT_CACHE", str(folder))
    return folder


@pytest.fixture
def published(effdet_file: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> zoo.ZooEntry:
    """A zoo entry for ``effdet_file`` served from a file:// URL named as torch.hub names files (hash prefix)."""
    src, digest = effdet_file
    served = tmp_path / "served" / f"tiny_lite0-{digest[:8]}.pth"
    served.parent.mkdir()
    served.write_bytes(src.read_bytes())
    return add_entry(monkeypatch, "tiny_lite0", served.as_uri(), digest[:8])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed: connections are refused


def test_download_check_and_load_then_cached(published: zoo.ZooEntry, cache: Path, effdet_file) -> None:
    model = densekit.create_model("efficientdet_lite0", weights="zoo:tiny_lite0")
    cached = cache / published.filename
    assert cached.is_file() and sorted(p.name for p in cache.iterdir()) == [published.filename]
    ref = torch.load(effdet_file[0], weights_only=True)
    assert model.num_classes == 90 and model.config.neck.channels == 16  # the entry's config keys were applied
    assert model.config.class_names[0] == "person" and model.config.class_names[89] == coco_category_names()[90]
    assert torch.equal(model.head.class_net.predict.conv_pw.weight, ref["class_net.predict.conv_pw.weight"])
    assert torch.equal(model.backbone.body.conv_stem.weight, ref["backbone.conv_stem.weight"])

    Path(published.url.removeprefix("file://")).unlink()  # the source is gone: a second use must not download
    mtime = cached.stat().st_mtime_ns
    again = densekit.create_model("efficientdet_lite0", weights="zoo:tiny_lite0")
    assert cached.stat().st_mtime_ns == mtime
    assert torch.equal(again.head.class_net.predict.conv_pw.weight, ref["class_net.predict.conv_pw.weight"])


def test_read_model_weights_gives_the_entrys_model_overrides(published: zoo.ZooEntry, cache: Path) -> None:
    weights = read_model_weights("zoo:tiny_lite0", prefer_ema=True)
    assert weights.model_overrides["num_classes"] == 90
    assert weights.class_names == [coco_category_names().get(i + 1, f"class {i}") for i in range(90)]
    assert weights.model_overrides["neck"] == {"channels": 16, "repeats": 1}
    assert "zoo:tiny_lite0" in weights.source and "model=efficientdet_lite0" in weights.source
    assert "class_net.predict.conv_pw.weight" in weights.state_dict  # still in the file's own (effdet) layout


def assert_clear_failure(err: CheckpointError, entry: zoo.ZooEntry, cache: Path) -> None:
    msg = str(err)
    assert entry.url in msg and str(cache / entry.filename) in msg and "copy it to that path" in msg
    assert not cache.exists() or list(cache.iterdir()) == []  # no file, no temporary file


def test_wrong_hash_is_refused_fast_and_leaves_nothing(published: zoo.ZooEntry, cache: Path, monkeypatch) -> None:
    bad = add_entry(monkeypatch, "tiny_bad_hash", published.url, "00000000")
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not the expected prefix 00000000") as err:
        read_model_weights("zoo:tiny_bad_hash")
    assert time.perf_counter() - start < 5
    assert_clear_failure(err.value, bad, cache)


def test_unreachable_url_fails_fast_and_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = add_entry(monkeypatch, "tiny_offline", f"http://127.0.0.1:{closed_port()}/tiny-0123abcd.pth", "0123abcd")
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="cannot download") as err:
        densekit.create_model("efficientdet_lite0", weights="zoo:tiny_offline")
    assert time.perf_counter() - start < 5
    assert_clear_failure(err.value, entry, cache)


def test_interrupted_download_leaves_no_temporary_file(published: zoo.ZooEntry, cache: Path, monkeypatch) -> None:
    class InterruptedBar(zoo.tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        zoo.fetch("tiny_lite0", progress=False)
    assert list(cache.iterdir()) == []


def test_a_wrong_file_placed_in_the_cache_is_named(published: zoo.ZooEntry, cache: Path) -> None:
    cache.mkdir()
    (cache / published.filename).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"cached file .* truncated or not the file published at"):
        zoo.fetch(published)


def test_a_file_placed_by_hand_is_used_without_download(effdet_file, cache: Path, monkeypatch) -> None:
    src, digest = effdet_file
    entry = add_entry(monkeypatch, "tiny_by_hand", f"http://127.0.0.1:{closed_port()}/tiny-{digest[:8]}.pth", digest[:8])
    cache.mkdir()
    (cache / entry.filename).write_bytes(src.read_bytes())  # what the error message tells an offline user to do
    assert zoo.fetch("zoo:tiny_by_hand") == cache / entry.filename


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(CheckpointError) as err:
        read_model_weights("zoo:tf_efficientdet_d9")
    msg = str(err.value)
    assert "unknown pretrained weights zoo:tf_efficientdet_d9" in msg
    assert all(name in msg for name in densekit.list_weights())


def test_list_weights_filters() -> None:
    assert densekit.list_weights("tf_efficientdet_lite*") == [f"tf_efficientdet_lite{i}" for i in range(5)]
    assert densekit.list_weights(model="efficientdet_d0") == ["efficientdet_d0", "tf_efficientdet_d0", "tf_efficientdet_d0_ap"]
    assert "lraspp_mobilenet_v3_large_coco_voc" in densekit.list_weights()


def test_default_cache_is_under_torch_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DENSEKIT_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / "hub" / "densekit"
