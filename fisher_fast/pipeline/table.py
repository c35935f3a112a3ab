"""The main job's report: Table 1 rows, printed as a table and drawn as a figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from fisher_fast.io import atomic_write


class Row(NamedTuple):
    """One line of Table 1: ``test_accuracy`` a fraction in [0, 1], ``parameters`` a count,
    ``search_seconds`` wall time of the search (0 for a hand-designed network), ``genotype``
    the cell's canonical string ("" for a hand-designed network)."""

    method: str
    test_accuracy: float
    parameters: int
    search_seconds: float
    genotype: str


GENOTYPE_LEGEND = (
    "cells: node 1 + node 2 + ..., each |op~i|...| the operations on the edges into that node "
    "from nodes i = 0, 1, ... (0 = the cell input, the last node its output; zero = no edge)"
)
"""How to read the genotype strings printed below the table (:meth:`Genotype.to_string`)."""


def format_table(rows: Sequence[Row], *, test_images: int | None = None, seeds: int = 1) -> str:
    """Rows as an aligned text table (accuracy in %, parameters in millions, seconds).

    With ``test_images`` (the test split's size), a first line says what one accuracy is
    measured on: that many images, ``seeds`` seeds, and what one image is worth in %."""
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
    lines = [fmt(header), rule, *(fmt(c) for c in cells)]
    if test_images is not None:
        lines.insert(0, format_test_size(test_images, seeds))
    return "\n".join(lines)


def format_test_size(test_images: int, seeds: int = 1) -> str:
    """E.g. "test accuracy on 360 test images, 1 seed (one image = 0.28%)"."""
    if test_images < 1 or seeds < 1:
        raise ValueError(f"need at least one test image and one seed, got {test_images}, {seeds}")
    return (
        f"test accuracy on {test_images} test images, {seeds} seed{'s' if seeds > 1 else ''} "
        f"(one image = {100 / test_images:.2g}%)"
    )


def format_genotypes(rows: Sequence[Row]) -> str:
    """The legend of the genotype strings, then one line per row that has a cell."""
    found = [f"  {r.method}: {r.genotype}" for r in rows if r.genotype]
    return "\n".join([GENOTYPE_LEGEND, *found]) if found else ""


def format_distances(
    distances_by_kind: dict[str, dict[str, float]], deciding: str, reason: str
) -> str:
    """The baselines' distances to the target under each Fisher kind (one column per kind,
    each kind's a* marked with ``*``), then which kind decides a* and ``reason`` why."""
    kinds = [deciding, *(k for k in distances_by_kind if k != deciding)]
    names = list(distances_by_kind[deciding])
    best = {k: min(distances_by_kind[k], key=distances_by_kind[k].__getitem__) for k in kinds}
    header = ["baseline", *(f"d ({k} Fisher)" for k in kinds)]
    cells = [
        [n, *(f"{distances_by_kind[k][n]:.4f}{'*' if best[k] == n else ' '}" for k in kinds)]
        for n in names
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        first = line[0].ljust(widths[0])
        return "  ".join([first, *(v.rjust(w) for v, w in zip(line[1:], widths[1:], strict=True))])

    agree = (
        "every kind chooses the same a*"
        if len(set(best.values())) == 1
        else "the kinds choose different a*"
    )
    return "\n".join(
        [
            fmt(header),
            *(fmt(c) for c in cells),
            f"a* = {best[deciding]} ({', '.join(f'{k}: {best[k]}' for k in kinds)}; {agree})",
            f"the {deciding} Fisher decides (the dictionary's setting): {reason}",
        ]
    )


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
