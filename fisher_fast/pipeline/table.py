"""The main job's report: Table 1 rows, printed as a table and drawn as a figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from fisher_fast.tasks.cache import atomic_write


class Row(NamedTuple):
    """One line of Table 1: ``test_accuracy`` a fraction in [0, 1], ``parameters`` a count,
    ``search_seconds`` wall time of the search (0 for a hand-designed network), ``genotype``
    the cell's canonical string ("" for a hand-designed network)."""

    method: str
    test_accuracy: float
    parameters: int
    search_seconds: float
    genotype: str


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table (accuracy in %, parameters in millions, seconds)."""
    header = ("method", "test accuracy (%)", "params (M)", "search time (s)")
    cells = [
        (
            r.method,
            f"{100 * r.test_accuracy:.2f}",
            f"{r.parameters / 1e6:.3f}",
            f"{r.search_seconds:.1f}" if r.search_seconds else "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        first = line[0].ljust(widths[0])
        return "  ".join([first, *(v.rjust(w) for v, w in zip(line[1:], widths[1:], strict=True))])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *(fmt(c) for c in cells)])


def plot_report(rows: Sequence[Row], distances: dict[str, float], closest: str, path: Path) -> Path:
    """Two panels: the baselines' Fréchet distances to the target (a* highlighted) and the
    methods' test accuracies. Written atomically as PNG (matplotlib's Agg canvas)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 0.45 * max(len(rows), len(distances)) + 2.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    names = list(distances)
    left.barh(
        names,
        [distances[n] for n in names],
        color=["tab:orange" if n == closest else "tab:gray" for n in names],
    )
    left.set_xlabel("Fréchet distance to the target")
    left.set_title("baselines (a* in orange)")
    left.invert_yaxis()
    right.barh([r.method for r in rows], [100 * r.test_accuracy for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        right.text(100 * r.test_accuracy, i, f" {100 * r.test_accuracy:.1f}", va="center")
    right.set_xlabel("test accuracy (%)")
    right.set_xlim(0, 110)
    right.set_title("target task")
    right.invert_yaxis()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(path, write)
    return path
