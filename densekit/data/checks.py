"""Image files checked before training, and what a dataset does with one it cannot read (``data.skip_unreadable``).

:func:`check_images` reads every listed image's header once at startup (PIL opens lazily: the pixels are not
decoded; about 50 us per file, where a full decode of a 640x480 JPEG costs ~100x that): the file exists, is not
empty, is an image, and has the size its annotations give (in the frame it is decoded in, EXIF orientation
included); a segmentation label must be readable and fit its image. Every problem is reported in one
:class:`DataError` before the first training step, so a bad photo never ends a run hours later, in its final
evaluation.

A file whose header is fine but whose pixels are not (a JPEG cut off before its image data) still fails to decode
later. With ``data.skip_unreadable=true`` the datasets take care of that too (:func:`read_item`): an evaluation
dataset returns a placeholder item that the evaluation loops leave out (:func:`is_skipped`), so the image is not
scored; a training dataset returns the next readable image instead. Files that disagree with their annotations
(another size) are refused either way: skipping them would hide wrong annotations.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from .converters.common import image_size
from .decode import decode_file

__all__ = [
    "DataError",
    "DatasetFiles",
    "ImageProblem",
    "POLICIES",
    "SKIPPED",
    "check_images",
    "exif_frame_hint",
    "file_problem",
    "find_problems",
    "header_size",
    "is_skipped",
    "placeholder_item",
    "read_item",
    "unreadable_policy",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Target key of the placeholder item an evaluation dataset returns for an image it cannot read (the reason).
SKIPPED = "skipped"
#: Problems a :class:`DataError` lists by name; the rest are counted.
SHOWN = 10
#: What a dataset does with an image it cannot read (:func:`unreadable_policy`, :func:`read_item`).
POLICIES = ("raise", "skip", "replace")
#: Readable images a training dataset tries in place of an unreadable one before it gives up.
MAX_REPLACEMENTS = 16
# Header reads wait on the disk (or a network share) more than on the CPU; PIL releases the GIL while it reads.
_THREADS = 8

# Files already reported as replaced in training, in this process: a file drawn every epoch is reported once.
_replaced: set[str] = set()


class DataError(ValueError):
    """Image files of a dataset cannot be used; the message names them and what to do."""


@dataclass(frozen=True)
class ImageProblem:
    """What is wrong with one image (or its label), worded for the user.

    Attributes:
        path: The image file.
        message: A sentence naming the file at fault and why.
        unreadable: The file (image or label) cannot be read, which ``data.skip_unreadable`` skips; ``False``: it
            is readable but disagrees with its annotations, which is refused either way.
    """

    path: Path
    message: str
    unreadable: bool = True


#: ``check_item(index, image_size)``: what is wrong with item ``index`` given its image's ``(H, W)`` (in the frame
#: it is decoded in), beyond the image file itself, e.g. another size in the json, an unreadable label file.
ItemCheck = Callable[[int, tuple[int, int]], "ImageProblem | None"]


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one dataset that :func:`check_images` reads (a dataset's ``listed_files``).

    Attributes:
        name: The split as the report names it, e.g. ``"val"``.
        images: Every image file, in dataset order.
        exif: The images are decoded in their EXIF-displayed frame (``data.exif_orientation``): their header size
            is read in that frame too.
        check_item: What the dataset knows about an item beyond the file (see :data:`ItemCheck`); ``None``: nothing.
    """

    name: str
    images: Sequence[Path]
    exif: bool = True
    check_item: ItemCheck | None = None


def exif_frame_hint(exif: bool, described: str, drawn: str) -> str:
    """What a size-mismatch error adds when the annotation fits the image's *other* frame (stored vs. displayed,
    see :mod:`densekit.data.decode`): which frame it is in, and the ``data.exif_orientation`` value that loads the
    image in that frame.

    Args:
        exif: Whether the image was decoded in its displayed frame (``data.exif_orientation``).
        described: The annotation and its verb, e.g. ``"the json describes"``, ``"the label describes"``.
        drawn: The annotation as the subject of "drawn on it", e.g. ``"the boxes were"``, ``"the label was"``.
    """
    if exif:
        return (f" (its EXIF orientation rotates it: {described} the stored frame; if {drawn} drawn on it, "
                "set data.exif_orientation=false)")
    return f" (its EXIF orientation rotates it: {described} the displayed frame; set data.exif_orientation=true)"


def unreadable_policy(data_cfg: Any, train: bool) -> str:
    """What a dataset does with an image it cannot decode: ``"raise"`` (default), or with ``data.skip_unreadable``
    ``"skip"`` (evaluation: a placeholder the loops leave out) or ``"replace"`` (training: another image)."""
    if not bool(data_cfg.get("skip_unreadable", False)):
        return "raise"
    return "replace" if train else "skip"


def file_problem(path: Path, what: str = "image") -> ImageProblem | None:
    """A missing or empty file (cheap: one ``stat``), worded as the decoders word it."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return ImageProblem(path, f"{what} file {path} does not exist")
    except OSError as error:
        return ImageProblem(path, f"{what} file {path} cannot be read: {error.strerror or error}")
    return ImageProblem(path, f"{what} file {path} is empty (0 bytes)") if size == 0 else None


def header_size(path: Path, exif: bool) -> tuple[int, int]:
    """``(H, W)`` of an image from its header, in the frame it is decoded in (``exif``).

    PIL reads headers only; a file PIL cannot identify (a format only OpenCV reads, or a broken file) is decoded
    as training would decode it, so a file is refused only when the decoder refuses it too.

    Raises:
        OSError: The file cannot be decoded (the decoder's message, naming the file).
    """
    try:
        return image_size(path, exif=exif)
    except (OSError, Image.DecompressionBombError):
        image = decode_file(path, exif=exif)
        return int(image.shape[0]), int(image.shape[1])


def item_problem(files: DatasetFiles, index: int) -> ImageProblem | None:
    """What is wrong with item ``index`` of ``files``: its image file, its header, then what the dataset checks."""
    path = Path(files.images[index])
    problem = file_problem(path)
    if problem is not None:
        return problem
    try:
        size = header_size(path, files.exif)
    except OSError as error:
        return ImageProblem(path, str(error))
    return files.check_item(index, size) if files.check_item is not None else None


def find_problems(files: DatasetFiles, threads: int = _THREADS) -> list[ImageProblem]:
    """Every problem of ``files``, in dataset order (headers read by ``threads`` threads)."""
    indices = range(len(files.images))
    if threads <= 1 or len(indices) < 2 * threads:
        found = [item_problem(files, i) for i in indices]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="image-check") as pool:
            found = list(pool.map(lambda i: item_problem(files, i), indices, chunksize=64))
    return [p for p in found if p is not None]


def _listing(problems: Sequence[tuple[str, ImageProblem]]) -> str:
    lines = [f"  {split}: {problem.message}" for split, problem in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    return "\n".join(lines)


def _refusal(problems: Sequence[tuple[str, ImageProblem]], total: int, skip_unreadable: bool) -> DataError:
    unreadable = sum(p.unreadable for _, p in problems)
    what = (f"{len(problems)} of {total} images cannot be used (every image was checked before training; "
            f"nothing was trained):\n{_listing(problems)}\n")
    if skip_unreadable:
        what += ("data.skip_unreadable=true leaves out unreadable files only: these disagree with their annotations; "
                 "fix the annotations (or data.exif_orientation, where named) or remove the images")
    else:
        what += "fix or remove these files (and their entries in the annotations)"
        if unreadable:
            which = "them" if unreadable == len(problems) else f"the {unreadable} unreadable ones"
            what += f", or set data.skip_unreadable=true to train and evaluate without {which}"
    return DataError(what)


def check_images(datasets: Sequence[DatasetFiles], skip_unreadable: bool = False, report: bool = True
                 ) -> list[tuple[str, ImageProblem]]:
    """Check every image of ``datasets`` (header only; see the module docstring) before any training.

    Args:
        datasets: The files of each dataset (e.g. the train and val splits).
        skip_unreadable: ``data.skip_unreadable``: unreadable files are left out (one warning with their count and
            names) instead of refused; files that disagree with their annotations are refused either way.
        report: Log the warning (the main process of a distributed run).

    Returns:
        The ``(split, problem)`` pairs skipped (empty when every file is fine).

    Raises:
        DataError: Files that cannot be used, the first :data:`SHOWN` named, with what to do.
    """
    problems = [(files.name, p) for files in datasets for p in find_problems(files)]
    total = sum(len(files.images) for files in datasets)
    refused = [(split, p) for split, p in problems if not (skip_unreadable and p.unreadable)]
    if refused:
        raise _refusal(refused, total, skip_unreadable)
    if problems and report:
        per_split = {files.name: sum(s == files.name for s, _ in problems) for files in datasets}
        counts = ", ".join(f"{n} {split}" for split, n in per_split.items() if n)
        log.warning("data.skip_unreadable=true: %d of %d images cannot be read and are left out (%s); "
                    "training draws other images in their place, evaluation does not score them:\n%s",
                    len(problems), total, counts, _listing(problems))
    return problems


def is_skipped(target: Mapping[str, Any]) -> bool:
    """Whether ``target`` is the placeholder of an image an evaluation dataset could not read (``SKIPPED``)."""
    return SKIPPED in target


def read_item(load: Callable[[int], T], index: int, length: int, policy: str,
              placeholder: Callable[[int, OSError], T]) -> T:
    """``load(index)``, the item of a dataset, with ``policy`` (:func:`unreadable_policy`) for the ``OSError`` of an
    image (or label) that cannot be read: ``"raise"`` it, ``"skip"``: return ``placeholder(index, error)``,
    ``"replace"``: load the next item instead (the same one every time, so a resumed run repeats the batch), up to
    :data:`MAX_REPLACEMENTS` times, warning once per file."""
    if policy == "raise":
        return load(index)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy for unreadable images {policy!r}; expected one of {POLICIES}")
    last: OSError | None = None
    for attempt in range(MAX_REPLACEMENTS + 1):
        try:
            return load((index + attempt) % length)
        except OSError as error:
            if policy == "skip":
                return placeholder(index, error)
            if str(error) not in _replaced:
                _replaced.add(str(error))
                log.warning("data.skip_unreadable=true: another image is trained on in place of this one: %s", error)
            last = error
    raise OSError(f"{MAX_REPLACEMENTS + 1} images in a row cannot be read (data.skip_unreadable=true); the last: "
                  f"{last}")


def placeholder_item(error: OSError, **target: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The item standing in for an unreadable image in evaluation: a 1x1 black image (batches pad it to their
    size) and a target holding ``target`` (``file``: the image) and the reason under :data:`SKIPPED`."""
    return torch.zeros(3, 1, 1), {**target, SKIPPED: str(error)}
