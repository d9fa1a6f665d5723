"""The ``tools/eval.py`` command that evaluates a training run's checkpoint as its final evaluation would have: what a
failed final evaluation (:class:`densekit.engine.trainer.FinalEvaluationError`) tells the user to run."""
from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["eval_command", "run_eval_command"]

# Keys of a training command that tools/eval.py takes too and that change what is evaluated, or how: the model's
# architecture (a training checkpoint records only its classes), the data and its options, the evaluation settings.
_SHARED_PREFIXES = ("model.", "data.", "eval.")
_SHARED_KEYS = ("device",)
_SKIP = "data.skip_unreadable"


def _key(override: str) -> str:
    """``model.neck.channels`` of ``+model.neck.channels=16`` (``+``, ``++`` and ``~`` prefixes dropped)."""
    return override.lstrip("+~").split("=", 1)[0]


def _shared(override: str) -> bool:
    key = _key(override)
    return key.startswith(_SHARED_PREFIXES) or key in _SHARED_KEYS


def _shown(tool: Path) -> str:
    """``tool`` relative to the working directory when it lies below it (``tools/eval.py``), else as it is."""
    cwd = Path.cwd()
    return str(tool.relative_to(cwd)) if tool.is_absolute() and tool.is_relative_to(cwd) else str(tool)


def eval_command(
    overrides: Sequence[str], choices: Mapping[str, str | None], weights: Path, skip_unreadable: bool,
    program: Sequence[str | Path],
) -> str:
    """The shell command that evaluates ``weights`` on the data a training command set up.

    Args:
        overrides: The training command's overrides (Hydra's ``overrides.task``): the model, data, eval and device
            keys are kept, the rest (``train.*``, ``weights=``, ``hydra.*``) are not evaluation settings.
        choices: The config group choices of the run (Hydra's ``runtime.choices``): ``model`` and ``data``.
        weights: The checkpoint to evaluate.
        skip_unreadable: Add ``data.skip_unreadable=true`` (in place of the run's own value), for an evaluation that
            failed on an image it could not read.
        program: The words that start the command, e.g. ``("python", Path("tools/eval.py"))`` or
            ``("densekit", "eval")``; a path is shown relative to the working directory when it lies below it.
    """
    args = [f"model={choices['model']}", f"data={choices['data']}"]
    args += [o for o in overrides if _shared(o) and not (skip_unreadable and _key(o) == _SKIP)]
    args.append(f"weights={weights}")
    if skip_unreadable:
        args.append(f"{_SKIP}=true")
    words = [_shown(w) if isinstance(w, Path) else w for w in program] + args
    return " ".join(shlex.quote(w) for w in words)


def run_eval_command(weights: Path | None, error: BaseException, program: Sequence[str | Path]) -> str:
    """:func:`eval_command` for the running Hydra job (tools/train.py), after its final evaluation raised ``error``
    (an ``OSError``: an image it could not read, which the command skips); ``""`` without ``weights``."""
    from hydra.core.hydra_config import HydraConfig

    if weights is None:
        return ""
    hydra = HydraConfig.get()
    return eval_command(list(hydra.overrides.task), dict(hydra.runtime.choices), weights, isinstance(error, OSError),
                        program)
