"""Reporting a distance matrix: JSON, annotated mean / standard-deviation heatmaps (like the
paper's Figure 2, drawn with matplotlib's Agg canvas: no display needed) and a printed table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fisher_fast.io import atomic_write, write_json
from fisher_fast.tasks.matrix_result import DistanceResult


def save_result(result: DistanceResult, out: Path) -> tuple[Path, Path]:
    """Write ``results-<fisher>.json`` and ``distance-<fisher>.png`` into ``out``; return both paths."""
    json_path, png_path = (
        out / f"results-{result.fisher}.json",
        out / f"distance-{result.fisher}.png",
    )
    write_json(json_path, result.to_dict())
    plot_heatmaps(result, png_path)
    return json_path, png_path


def plot_heatmaps(result: DistanceResult, path: Path, title: str | None = None) -> Path:
    """Two annotated heatmaps, mean (left) and standard deviation (right) over trials; rows are
    source tasks, columns target tasks. Written atomically as PNG."""
    legend = ", ".join(f"{i}: {name}" for i, name in enumerate(result.tasks))
    return draw_heatmaps(
        [
            ("mean", result.mean.numpy(), "viridis"),
            ("standard deviation", result.std.numpy(), "magma"),
        ],
        title or f"{result.arch}, {result.fisher} Fisher, {len(result.seeds)} seeds\n{legend}",
        path,
    )


def draw_heatmaps(panels: list[tuple[str, np.ndarray, str]], title: str, path: Path) -> Path:
    """Side-by-side annotated heatmaps of (K, K) matrices, one per ``(label, matrix,
    colormap)``, rows labelled "source task" and columns "target task", under ``title``; the
    colour scale of each runs from min(0, its minimum) to its maximum. Written atomically as
    PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.figure import Figure

    k = panels[0][1].shape[0]
    fig = Figure(figsize=(4.2 * len(panels) + 0.8, 0.55 * k + 2.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, values, cmap) in zip(axes, panels, strict=True):
        low = min(0.0, float(values.min()))
        high = max(float(values.max()), low + 1e-12)
        image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high)
        for a in range(k):
            for b in range(k):
                dark = values[a, b] < low + 0.6 * (high - low)
                ax.text(
                    b,
                    a,
                    f"{values[a, b]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(k), [f"{i}" for i in range(k)])
        ax.set_yticks(range(k), [f"{i}" for i in range(k)])
        ax.set_xlabel("target task")
        ax.set_ylabel("source task")
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return path


def format_matrix(result: DistanceResult) -> str:
    """The mean ± std matrix as text, with the closest source of each target and the accuracies."""
    k = len(result.tasks)
    mean, std = result.mean, result.std
    trials = len(result.seeds)
    width = 16 if trials > 1 else 8
    summary = f"mean ± std over {trials} seeds" if trials > 1 else f"seed {result.seeds[0]}"
    lines = [
        f"Fréchet task distance d[source, target], {result.arch}, {result.fisher} Fisher, {summary} "
        "(rows: source, columns: target)",
        "source \\ target".ljust(16) + "".join(f"{b:>{width}d}" for b in range(k)),
    ]
    for a in range(k):
        cells = [
            f"{float(mean[a, b]):.4f}" + (f" ± {float(std[a, b]):.4f}" if trials > 1 else "")
            for b in range(k)
        ]
        lines.append(f"{a}".ljust(16) + "".join(c.rjust(width) for c in cells))
    lines.append("")
    closest = result.closest_sources()
    accuracy = result.test_accuracy.mean(0)
    for b, name in enumerate(result.tasks):
        lines.append(
            f"task {b} ({name}): closest source task {closest[b]}, probe test accuracy {float(accuracy[b]):.4f} "
            f"(min {float(result.test_accuracy[:, b].min()):.4f}; 1 - ε = {1 - result.epsilon:.2f})"
        )
    return "\n".join(lines)
