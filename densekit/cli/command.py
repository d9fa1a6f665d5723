"""The ``densekit`` command (also ``python -m densekit``): ``densekit <command> [arguments]``.

Each command is one of the tools, with exactly the arguments its ``python tools/<tool>.py`` takes in a checkout
(Hydra overrides; ``convert``: its options), its output layout and its error style (:mod:`densekit.cli.errors`)::

    densekit train model=efficientdet_d0 data=coco train=default
    densekit predict input=photos/ weights=outputs/my_run/checkpoints/last.pth
    densekit eval --help        # the command's own help: Hydra's config groups and keys

``densekit --help`` lists the commands and the models (:func:`densekit.list_models`).
"""
from __future__ import annotations

import difflib
import importlib
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_USER_ERROR, run_tool

PROG = "densekit"
HELP_FLAGS = ("-h", "--help", "help")


@dataclass(frozen=True)
class Command:
    """A sub-command: the module whose ``main()`` runs it, and its line in ``densekit --help``."""

    module: str
    summary: str


#: Every sub-command, in the order ``densekit --help`` lists them.
COMMANDS: dict[str, Command] = {
    "train": Command("densekit.cli.train", "train a model (no overrides: EfficientDet-Lite0 on a synthetic dataset)"),
    "eval": Command("densekit.cli.eval", "score a checkpoint or exported artifact: COCO AP or mIoU"),
    "predict": Command("densekit.cli.predict", "run a model on images, a folder, a video or a webcam"),
    "export": Command("densekit.cli.export", "export to ONNX / OpenVINO / TensorRT, checked against PyTorch"),
    "benchmark": Command("densekit.benchmarks.benchmark", "latency / FPS of a model, optionally against effdet, "
                                                          "torchvision and deployment runtimes"),
    "convert": Command("densekit.cli.convert_dataset", "convert a Pascal VOC or YOLO dataset to a COCO json"),
    "inspect": Command("densekit.cli.inspect_dataset", "check a dataset: class counts, box sizes, anchor fit, "
                                                       "problems, report folder"),
    "summary": Command("densekit.cli.summary", "parameters, MACs, anchors and output levels of a model"),
    "quantize": Command("densekit.cli.quantize", "int8 model from a checkpoint: accuracy and latency against fp32"),
}


def help_text() -> str:
    """``densekit --help``: usage, one line per command, the model names."""
    import densekit  # late: torch; only the help and the commands need it

    width = max(map(len, COMMANDS))
    commands = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    models = textwrap.fill(", ".join(densekit.list_models()), width=100, initial_indent="  ", subsequent_indent="  ")
    return "\n".join([
        "usage: densekit <command> [Hydra overrides: key=value group=option ...]",
        "       (python -m densekit <command> ...; in a checkout, python tools/<tool>.py ... alike)",
        "",
        "commands:",
        *commands,
        "",
        "densekit <command> --help shows what the command takes (for the Hydra tools: config groups and keys).",
        "",
        "models (model=...; densekit.create_model):",
        models,
    ])


def run_command(name: str, args: Sequence[str]) -> None:
    """Run the tool of command ``name`` with ``args``, as its script would run with them."""
    tool = importlib.import_module(COMMANDS[name].module)
    # The tools read their arguments from sys.argv (Hydra, argparse); the command's name stands in for the script's,
    # so that their usage lines say "densekit <name>" (and command_words knows). Hydra names the job after the tool's
    # module: outputs/ and the job's log file are those of python tools/<tool>.py.
    sys.argv = [f"{PROG} {name}", *args]
    tool.main()


def command_words(name: str) -> tuple[str | Path, ...]:
    """The words that start command ``name`` the way the running tool was started, for a message that tells the user
    what to run next: ``densekit eval`` under the densekit command, else the script of that name beside the running
    one (``python tools/eval.py`` from ``python tools/train.py``; commands of tools/)."""
    if sys.argv[0].startswith(f"{PROG} "):  # run_command's
        return (PROG, name)
    return ("python", Path(sys.argv[0]).with_name(COMMANDS[name].module.rpartition(".")[2] + ".py"))


def unknown_command(name: str) -> str:
    """The error block for a command that does not exist: the closest one, and the list."""
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"error: unknown command {name!r}{hint}\n  commands: {', '.join(COMMANDS)} (densekit --help)"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``densekit`` / ``python -m densekit``: ``argv`` (default ``sys.argv[1:]``) is the command and
    its arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in HELP_FLAGS:
        run_tool(lambda: print(help_text()))  # listing models reads $DENSEKIT_CONF: a bad folder is an error block
        return
    if args[0] not in COMMANDS:
        print(unknown_command(args[0]), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    run_command(args[0], args[1:])
