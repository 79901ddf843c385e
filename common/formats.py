"""How the reports print numbers and Markdown tables, so that REPORT.md, REPORT.pdf and
placements.md round every value the same way.

Every result is copied from the JSON files and only rounded:
    accuracies, recalls, chance level   4 decimals              0.8800        (fmt_acc)
    differences in percentage points    2 decimals with a sign  +1.25         (fmt_points)
    times in seconds, images per second 1 decimal               260.2         (fmt_1)
    parameter counts                    exact, comma-grouped    11,173,962    (fmt_count)
    settings (lr, weight decay, ...)    Python's %g             0.0005        (fmt_setting)
A value the JSON lacks prints as 'n/a'.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def fmt_acc(v: Any) -> str:
    """Accuracy / recall / chance: 4 decimals."""
    return "n/a" if v is None else f"{float(v):.4f}"


def fmt_points(v: Any) -> str:
    """A difference in percentage points, signed: +1.25."""
    return "n/a" if v is None else f"{round(float(v), 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"


def fmt_1(v: Any) -> str:
    """Seconds, images per second: 1 decimal."""
    return "n/a" if v is None else f"{float(v):.1f}"


def fmt_count(v: Any) -> str:
    """A parameter count, exact: 11,173,962."""
    return "n/a" if v is None else f"{int(v):,}"


def fmt_gflops(flops: float) -> str:
    """FLOPs as GFLOPs, 4 decimals."""
    return f"{flops / 1e9:.4f}"


def fmt_setting(v: Any) -> str:
    """A training setting as the user typed it: %g for floats, yes/no for flags."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_epochs(r: Mapping[str, Any]) -> str:
    """'best/run' epochs, e.g. 5/8."""
    return f"{r.get('best_epoch', 'n/a')}/{r.get('epochs_run', 'n/a')}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines, followed by an empty line; '|' and newlines in cells are
    escaped so that a value can never break the table."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]
