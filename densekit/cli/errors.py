"""One error style for every tool: a user's mistake is one ``error:`` block and exit code 2, a bug its traceback.

A mistake the user can fix from the command line (a missing file, a typo'd key, a checkpoint of another model, bad
data) raises one of :data:`USER_ERRORS` somewhere in densekit; :func:`run_tool` turns it into::

    error: unknown config key train.lrr (from the override train.lrr=0.1); did you mean train.lr?
      valid keys under train: amp, base_lr, batch_size, ...

on stderr and exits with 2, the exit code of a usage error (as argparse). Anything else (a ``TypeError``, an
``IndexError``, a ``RuntimeError`` from a kernel) is a bug and keeps its traceback. ``DENSEKIT_DEBUG=1`` or Hydra's own
``HYDRA_FULL_ERROR=1`` shows the traceback of user errors too.

Hydra reports its own errors (an unknown key or config group option, a malformed override) in a format of its own and
exits with 1; :func:`run_tool` sets ``HYDRA_FULL_ERROR=1`` while the tool runs so that they reach it as exceptions
and are worded like densekit's.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

__all__ = ["EXIT_USER_ERROR", "USER_ERRORS", "UsageError", "debug_requested", "describe", "reports_user_errors",
           "run_tool"]

T = TypeVar("T")

EXIT_USER_ERROR = 2

# Marks a HYDRA_FULL_ERROR that _hydra_raises set (inherited by the tool's subprocesses too), not the user.
_SET_BY_DENSEKIT = "DENSEKIT_SET_HYDRA_FULL_ERROR"


class UsageError(ValueError):
    """A command-line setting that cannot work, worded for the user (which key, what to pass instead)."""


# What a user causes and fixes: densekit's own errors are ValueErrors (CheckpointError, ArtifactError, RunDirError,
# ConversionError, UsageError...) or OSErrors (a missing or unreadable file); Hydra's are HydraExceptions (an unknown
# key, group option or a malformed override); a ``???`` value left unset is omegaconf's MissingMandatoryValue. A
# diverged training is the user's settings too (its message names the last checkpoint and what to lower).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, HydraException, MissingMandatoryValue)


def _user_errors() -> tuple[type[BaseException], ...]:
    from densekit.engine.hooks import TrainingDiverged  # engine imports torch: only when a tool runs

    return (*USER_ERRORS, TrainingDiverged)


def debug_requested() -> bool:
    """Whether the user asked for tracebacks: ``DENSEKIT_DEBUG``, or a ``HYDRA_FULL_ERROR`` that densekit did not set,
    is set and not 0."""
    def on(name: str) -> bool:
        return os.environ.get(name, "0") not in ("", "0")

    return on("DENSEKIT_DEBUG") or on("HYDRA_FULL_ERROR") and not on(_SET_BY_DENSEKIT)


def _unknown_key(err: HydraException, cause: ConfigAttributeError | ConfigKeyError) -> str:
    """``train.lrr=0.1`` -> the key, the override, the closest valid key and the valid keys at that level."""
    full_key = str(cause.full_key)
    override = re.search(r"use \+(\S+)", str(err))
    parent, _, key = full_key.rpartition(".")
    valid = sorted(str(k) for k in cause.parent_node.keys()) if cause.parent_node is not None else []
    close = difflib.get_close_matches(key, valid, n=1)
    text = f"unknown config key {full_key}"
    if override:
        text += f" (from the override {override.group(1)})"
    if close:
        text += f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    if valid:
        text += f"\nvalid keys under {parent or 'the top level'}: {', '.join(valid)}"
    return text + f"\n(a key of your own that the config lacks is added with +{full_key}=...)"


def _missing_option(err: MissingConfigException) -> str:
    """Hydra's "Could not find 'model/efficientdet_d9'" with its option list, less the private schema entries and the
    search path."""
    text = str(err).split("\nConfig search path:")[0]
    found = re.search(r"Could not find '([^']+)/([^']+)'", text)
    options_block = text.split("Available options in", 1)[1] if "Available options in" in text else ""
    options = [line.strip() for line in options_block.splitlines()[1:] if line.startswith("\t")]
    options = [o for o in options if not o.startswith("_")]
    if not found:
        return text
    group, name = found.groups()
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    listed = f"\navailable: {', '.join(options)}" if options else ""
    return f"unknown {group}={name}{hint}{listed}"


def describe(err: BaseException) -> str:
    """The text after ``error:`` for a user error: what is wrong and, where densekit knows, what to do."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, HydraException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        if cause.full_key and "not in" in str(cause):  # "Key 'x' not in 'TrainConfig'" / "... is not in struct"
            return _unknown_key(err, cause)
    text = str(err) or type(err).__name__
    if isinstance(err, HydraException) and cause is not None:
        text += f"\n{cause}"
    if isinstance(err, OSError) and err.strerror:  # "[Errno 2] No such file or directory: 'x'" -> "...: x"
        text = err.strerror + (f": {err.filename}" if err.filename else "")
        text += f" -> {err.filename2}" if err.filename2 else ""
    return text


def _block(text: str) -> str:
    """``error:`` and the text, its further lines indented under it."""
    lines = [line.rstrip() for line in text.strip().splitlines()] or [""]
    return "\n".join([f"error: {lines[0]}", *(f"  {line}" if line else "" for line in lines[1:])])


@contextmanager
def _hydra_raises() -> Iterator[None]:
    """Hydra lets its exceptions through (instead of printing its own report and exiting with 1) inside the block."""
    if os.environ.get("HYDRA_FULL_ERROR") is not None:  # the user's (or an outer tool's): raising already
        yield
        return
    os.environ.update({"HYDRA_FULL_ERROR": "1", _SET_BY_DENSEKIT: "1"})
    try:
        yield
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.pop(_SET_BY_DENSEKIT, None)


def report(err: BaseException) -> NoReturn:
    """Print the ``error:`` block for ``err`` and exit with :data:`EXIT_USER_ERROR`."""
    print(_block(describe(err)) + "\n  (DENSEKIT_DEBUG=1 shows where it was raised)", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_tool(entry: Callable[[], Any], also: tuple[type[BaseException], ...] = ()) -> Any:
    """Run a tool's entry point (a ``hydra.main`` function or an argparse ``main``) with densekit's error style;
    ``also``: further exception types that are user errors for this tool (e.g. a failed export). Catches what
    happens before a Hydra job starts (config composition); :func:`reports_user_errors` what happens inside it."""
    with _hydra_raises():
        return _reported(entry, also)()


def _reported(function: Callable[..., T], also: tuple[type[BaseException], ...]) -> Callable[..., T]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except (*_user_errors(), *also) as err:
            if debug_requested():
                raise
            report(err)
    return wrapper


def reports_user_errors(
    also: tuple[type[BaseException], ...] = ()
) -> Callable[[Callable[[DictConfig], T]], Callable[[DictConfig], T]]:
    """Decorate a tool's Hydra task function (under ``@hydra.main``): a user error inside the job is reported by
    densekit (without Hydra's "Error executing job with overrides" line) and exits with 2."""
    return lambda task: _reported(task, also)
