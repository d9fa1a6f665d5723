"""Reading checkpoint files, loading them all-or-nothing, and writing any file atomically.

* :func:`read_checkpoint` is the one place a checkpoint file is opened (``weights_only=True``);
  :func:`read_state_dict` / :func:`state_dict_from` take the flat state_dict out of what it returns.
* Every importer (densekit's own files, efficientdet-pytorch, efficientnet_pytorch, torchvision) ends in
  :func:`load_state_dict_checked`, so a checkpoint that does not fit is refused with the full list of bad keys and
  the model is left untouched, never loaded half-way.
* :func:`atomic_write` is how densekit writes every file a reader or a later run relies on (checkpoints, JSON,
  images, zips, ONNX graphs): a reader, or a crash mid-write, never sees half a file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or its tensors do not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file safely (``weights_only=True``) and return what it holds, unchanged.

    That is a state_dict (bare or wrapped, see :func:`state_dict_from`) or a densekit training state
    (:func:`~densekit.checkpoint.train_state.save_checkpoint`): tensors, numbers, strings, dicts and lists only.

    Raises:
        CheckpointError: the file is missing or cannot be unpickled as weights; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}\n(weights= takes a checkpoint such as <run "
                              "directory>/checkpoints/last.pth, an exported .onnx / .xml / .engine, or zoo:<name>)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / non-weights files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def state_dict_from(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state_dict in ``obj``, an object :func:`read_checkpoint` returned for ``path``.

    Accepts a bare state_dict or the usual wrappers (``{"model": ...}`` as densekit's training state,
    ``{"state_dict": ...}``); ``"ema"`` / ``"state_dict_ema"`` are *not* preferred silently: the plain weights are
    what a user saved. The ``module.`` prefix of DataParallel / DDP checkpoints is removed.

    Raises:
        CheckpointError: ``obj`` holds no tensors (naming ``path``).
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{os.fspath(path)} holds no state_dict (found {type(obj).__name__})")
    # Checkpoints saved from DataParallel / DDP prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` then :func:`state_dict_from`: the flat state_dict of a checkpoint file.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no tensors.
    """
    return state_dict_from(read_checkpoint(path), path)


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module`` only if every key and shape matches.

    Args:
        module: The model (or sub-module) to fill.
        state_dict: Tensors keyed as in ``module.state_dict()``.
        source: What the tensors came from, quoted in the error.

    Raises:
        CheckpointError: listing missing, unexpected and wrongly shaped keys. The module is unchanged.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(format_key_report(source, missing, unexpected, mismatched))
    module.load_state_dict(state_dict, strict=True)


def format_key_report(source: str, missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 20) -> str:
    """One readable message naming the keys that kept a checkpoint from loading."""

    def block(title: str, keys: list[str]) -> str:
        if not keys:
            return ""
        shown = "\n    ".join(keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"\n  {title} ({len(keys)}):\n    {shown}{more}"

    return (
        f"{source} does not fit the model; nothing was loaded."
        + block("missing keys", missing)
        + block("unexpected keys", unexpected)
        + block("wrongly shaped keys", mismatched)
    )


def _read_umask() -> int:
    # The umask can only be read by setting it. Done once, at import, before densekit starts threads that write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates its file private (0600), and a rename keeps that: give the result the mode a plain open() would.
_NEW_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` all at once: readers (and a crash at any point) see the old file or the whole new one.

    Yields a file opened on a temporary file with a unique name in the same folder (so two writers of the same path
    never share it, and the final rename stays on one filesystem). When the block ends, the data is flushed and
    fsynced, then ``os.replace`` renames it over ``path``, which is atomic on POSIX and Windows. If the block
    raises, the temporary file is removed and ``path`` is untouched. Parent folders are created; the new file gets
    the permissions a plain ``open()`` would give it (``0o666`` minus the umask).

    Args:
        path: The destination.
        mode: ``"wb"`` for bytes (``torch.save``, encoded images, zips, ONNX) or ``"w"`` for UTF-8 text.

    Raises:
        OSError: the filesystem took no more bytes (a full disk or quota; also ``torch.save``'s stream-writer
            ``RuntimeError``, which hides that): the message names ``path``, the space left on its filesystem and
            what to do; ``errno`` is the cause's (``ENOSPC`` for a full disk). Any other error passes unchanged.

    Example:
        ``with atomic_write(out / "last.pth") as f: torch.save(state, f)``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data reaches the disk before the rename makes it the file
        os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        written = _size_or_none(tmp)
        Path(tmp).unlink(missing_ok=True)  # before measuring the free space: the partial file's bytes are back
        cause = _write_failure(err)
        if cause is None:
            raise
        raise _no_space_error(path, cause, written) from err


# errnos that mean the filesystem took no more bytes. Only these are translated: the block may also read (a download,
# a source file), and an error of that reading is not about the destination.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# torch.save reports a failed write as a RuntimeError from its C++ stream writer, with the OSError (if the write was
# Python's) only as __context__: "[enforce fail at inline_container.cc:...] unexpected pos ..." when it wrote to a
# file object, "PytorchStreamWriter failed writing file ..." when it wrote to a path itself.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed writing file", "enforce fail at inline_container")


def _write_failure(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` when ``err`` is a failed write (for torch's RuntimeError, an OSError without errno
    when torch kept none), else ``None``."""
    if isinstance(err, OSError):
        return err if err.errno in _NO_SPACE_ERRNOS else None
    if not (isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITE_FAILURES)):
        return None
    inner: BaseException | None = err
    while inner is not None:  # walk the chain torch left: the Python write's own error, when there was one
        if isinstance(inner, OSError):
            return inner
        inner = inner.__cause__ or inner.__context__
    return OSError(f"torch.save could not write ({str(err).strip()})")


def _no_space_error(path: Path, cause: OSError, written: int | None) -> OSError:
    """The error :func:`atomic_write` raises for a failed write: where, why, the space left and what to do."""
    try:
        free = f"{_format_bytes(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    done = f", {_format_bytes(written)} written before it failed" if written else ""
    kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
    reason = cause.strerror or str(cause)
    message = (
        f"cannot write {path}: {reason} ({free} on its filesystem{done}){kept}. "
        "Free some space, or choose another run directory / output path."
    )
    return OSError(cause.errno, message) if cause.errno is not None else OSError(message)


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _format_bytes(size: int) -> str:
    """``size`` in bytes as people read it: ``"512 B"``, ``"3.2 MiB"``, ``"1.5 GiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {units[unit]}"
