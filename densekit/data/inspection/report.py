"""The report of ``densekit inspect``: problems by kind, the one-screen summary, the report files, and the checks
both tasks share (the image files' headers, duplicate files)."""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...checkpoint.io import atomic_write
from ...modeling.anchor_fit import WARN_BELOW
from ...utils.files import atomic_save_json
from ..checks import DatasetFiles, find_problems

#: Every problem kind, with what it means (the summary and ``inspect.allow`` name them).
KINDS: dict[str, str] = {
    "unreadable_image": "image files that are missing, empty or not images",
    "size_mismatch": "sizes in the annotations that disagree with the image file",
    "duplicate_file": "files with the same content, or listed twice",
    "empty_image": "images without boxes",
    "degenerate_box": "boxes of zero width or height",
    "outside_box": "boxes outside their image",
    "small_box": "boxes smaller than the smallest anchor",
    "class_without_boxes": "categories without boxes",
    "low_anchor_recall": f"anchor recall below {WARN_BELOW}",
    "label_values": "label values that are neither classes nor ignore",
    "class_without_pixels": "classes without labelled pixels",
}
#: Problems of a kind the summary shows (problems.txt has them all).
EXAMPLES = 2
_THREADS = 8  # files hashed at once


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset: its kind (a key of :data:`KINDS`) and a line naming the file / annotation."""

    kind: str
    message: str


class DatasetProblems(ValueError):
    """``inspect.strict=true`` and the dataset has problems; the message lists them (a user error: exit code 2)."""


@dataclass
class Inspection:
    """The result of an inspection: the summary's sections, the problems, the numbers and the report folder."""

    title: str
    out_dir: Path
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def kinds(self) -> Counter[str]:
        """How many problems of each kind, in :data:`KINDS` order."""
        counts = Counter(p.kind for p in self.problems)
        return Counter({k: counts[k] for k in KINDS if counts[k]})

    def problem_lines(self, problems: Sequence[Problem] | None = None, examples: int | None = EXAMPLES) -> list[str]:
        """``kind (count): first message`` per kind, with up to ``examples`` messages (``None``: all)."""
        problems = self.problems if problems is None else problems
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for p in problems:
            by_kind[p.kind].append(p)
        lines = []
        for kind in KINDS:
            found = by_kind.get(kind, [])
            if not found:
                continue
            lines.append(f"{kind} ({len(found)}): {KINDS[kind]}")
            shown = found if examples is None else found[:examples]
            lines += [f"    {p.message}" for p in shown]
            if len(found) > len(shown):
                lines.append(f"    ... and {len(found) - len(shown)} more")
        return lines

    def summary(self) -> str:
        """The one-screen summary: every section, the problems by kind with examples, the report folder."""
        width = max([len(name) for name, _ in self.sections] + [8])
        out = [self.title]
        for name, lines in self.sections:
            for i, line in enumerate(lines):
                out.append(f"{name if i == 0 else '':<{width}}  {line}")
        problems = self.problem_lines()
        kinds = self.kinds()
        head = (f"{len(self.problems)} of {len(kinds)} kind{'s' if len(kinds) != 1 else ''} (every one in "
                "problems.txt)" if problems else "none found")
        for i, line in enumerate([head, *problems]):
            out.append(f"{'problems' if i == 0 else '':<{width}}  {line}")
        out.append(f"{'report':<{width}}  {self.out_dir}/ ({', '.join(self.files)})")
        return "\n".join(out)

    def check(self, allow: Iterable[str] = ()) -> None:
        """Raise :class:`DatasetProblems` listing the problems whose kind is not in ``allow``."""
        allowed = set(allow)
        unknown = sorted(allowed - set(KINDS))
        if unknown:
            raise ValueError(f"inspect.allow: unknown problem kinds {unknown}; known: {', '.join(KINDS)}")
        failing = [p for p in self.problems if p.kind not in allowed]
        if not failing:
            return
        kinds = sorted({p.kind for p in failing}, key=list(KINDS).index)
        raise DatasetProblems("\n".join([
            f"inspect.strict=true: {self.title.split(': ', 1)[-1]} has {len(failing)} problems "
            f"({', '.join(kinds)}):",
            *self.problem_lines(failing, examples=5),
            f"every problem: {self.out_dir / 'problems.txt'}; to let a kind pass: inspect.allow=[{kinds[0]},...]",
        ]))

    def write(self) -> None:
        """summary.txt, problems.txt and report.json in :attr:`out_dir` (the charts are written as they are made)."""
        self.files = [*self.files, "summary.txt", "problems.txt", "report.json"]
        with atomic_write(self.out_dir / "problems.txt", "w") as f:
            f.write("".join(f"{p.kind}\t{p.message}\n" for p in self.problems))
        atomic_save_json({**self.stats, "problems": {k: [p.message for p in self.problems if p.kind == k]
                                                     for k in self.kinds()}}, self.out_dir / "report.json")
        with atomic_write(self.out_dir / "summary.txt", "w") as f:
            f.write(self.summary() + "\n")


def _sha1(path: Path) -> str | None:
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None  # reported as unreadable by the header check
    return digest.hexdigest()


def duplicate_files(paths: Sequence[Path], name: Callable[[Path], str] = str) -> list[Problem]:
    """One ``duplicate_file`` problem per group of files with the same content, and per file listed more than once;
    ``name`` words a path for the message."""
    problems = [Problem("duplicate_file", f"{name(path)} is listed {count} times")
                for path, count in Counter(paths).items() if count > 1]
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(_THREADS, thread_name_prefix="inspect-hash") as pool:
        digests = list(pool.map(_sha1, unique))
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, digest in zip(unique, digests):
        if digest is not None:
            groups[digest].append(path)
    for digest, group in groups.items():
        if len(group) > 1:
            problems.append(Problem("duplicate_file", f"{', '.join(name(p) for p in group)} have the same content "
                                                      f"(SHA-1 {digest[:12]})"))
    return problems


def file_problems(files: DatasetFiles) -> list[Problem]:
    """The header check of :mod:`densekit.data.checks`: unreadable files, and sizes that disagree with the file."""
    return [Problem("unreadable_image" if p.unreadable else "size_mismatch", p.message) for p in find_problems(files)]


def sample_order(count: int, first: Iterable[int], samples: int) -> list[int]:
    """Up to ``samples`` indices: ``first`` (items with problems) then a seeded random draw of the rest."""
    chosen = list(dict.fromkeys(i for i in first if 0 <= i < count))[: samples // 2]
    rest = [int(i) for i in np.random.default_rng(0).permutation(count) if int(i) not in chosen]
    return (chosen + rest)[:samples]


def percentiles(values: np.ndarray, spec: str = ".0f") -> str:
    if len(values) == 0:
        return "-"
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return f"median {p50:{spec}} (5-95%: {p5:{spec}}-{p95:{spec}})"
