"""Reporting the §4.4 study: JSON, the paper's Figure 7 (distance mean, standard deviation and
the transfer affinity) and Figure 8 (per target, distance against transfer gain), and a
printed summary."""

from __future__ import annotations

import math
from pathlib import Path

from fisher_fast.io import atomic_write, write_json
from fisher_fast.tasks.dense.study_result import DenseStudyResult
from fisher_fast.tasks.report import draw_heatmaps


def save_dense_result(result: DenseStudyResult, out: Path) -> tuple[Path, Path, Path]:
    """Write ``dense-<fisher>.json``, ``dense-<fisher>.png`` and ``dense-<fisher>-ranks.png``
    into ``out``; return the three paths."""
    stem = f"dense-{result.fisher}"
    paths = (out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}-ranks.png")
    write_json(paths[0], result.to_dict())
    legend = ", ".join(f"{i}: {name}" for i, name in enumerate(result.tasks))
    draw_heatmaps(
        [
            ("Fréchet distance, mean", result.distance_mean.numpy(), "viridis"),
            ("Fréchet distance, standard deviation", result.distance_std.numpy(), "magma"),
            ("transfer gain 1 - L(a→b) / L(scratch→b), mean", result.gain_mean.numpy(), "cividis"),
        ],
        f"autoencoder probes, {result.fisher} regression Fisher, {len(result.seeds)} seeds\n{legend}",
        paths[1],
    )
    plot_ranks(result, paths[2])
    return paths


def plot_ranks(result: DenseStudyResult, path: Path) -> Path:
    """One panel per target task b: every other source a at (d[a, b], gain[a, b]) (means over
    trials, labelled by a's index), with the column's Spearman ρ in the title."""
    from matplotlib.figure import Figure

    k = len(result.tasks)
    distance, gain = result.distance_mean, result.gain_mean
    agreement = result.agreement()
    columns = 4
    rows = math.ceil(k / columns)
    fig = Figure(figsize=(3.2 * columns, 2.8 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for b in range(k):
        ax = axes[b]
        sources = [a for a in range(k) if a != b]
        ax.scatter([float(distance[a, b]) for a in sources], [float(gain[a, b]) for a in sources])
        for a in sources:
            ax.annotate(str(a), (float(distance[a, b]), float(gain[a, b])), fontsize=8)
        ax.set_title(
            f"target {b}: {result.tasks[b]} (ρ = {agreement['per_target'][b]:.2f})", fontsize=9
        )
        ax.set_xlabel("Fréchet distance d[a, b]", fontsize=8)
        ax.set_ylabel("transfer gain", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[k:]:
        ax.set_visible(False)
    fig.suptitle(
        f"per target: distance against transfer gain of each source (means over {len(result.seeds)} "
        f"seeds); all pairs: Spearman ρ = {agreement['spearman']:.3f}, p = {agreement['p_value']:.4f}",
        fontsize=9,
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return path


def format_dense(result: DenseStudyResult) -> str:
    """The distance matrix (mean ± std), the transfer gains, the probes' R² and the rank
    agreement, as text."""
    k = len(result.tasks)
    trials = len(result.seeds)
    mean, std, gain = result.distance_mean, result.distance_std, result.gain_mean
    header = "source \\ target".ljust(16) + "".join(f"{b:>16d}" for b in range(k))
    lines = [
        "tasks: "
        + "; ".join(
            f"{i}: {t} ({d})"
            for i, (t, d) in enumerate(zip(result.tasks, result.descriptions, strict=True))
        )
    ]
    lines += [
        f"Fréchet task distance d[source, target], {result.fisher} regression Fisher, "
        f"mean ± std over {trials} seeds",
        header,
    ]
    for a in range(k):
        cells = "".join(
            f"{float(mean[a, b]):.4f} ± {float(std[a, b]):.4f}".rjust(16) for b in range(k)
        )
        lines.append(f"{a}".ljust(16) + cells)
    lines += ["", f"transfer gain 1 - L(a->b) / L(scratch->b), mean over {trials} seeds", header]
    for a in range(k):
        lines.append(
            f"{a}".ljust(16) + "".join(f"{float(gain[a, b]):+.4f}".rjust(16) for b in range(k))
        )
    r2 = result.test_r2
    lines.append("")
    lines.append(
        "probe test R²: "
        + ", ".join(
            f"{b}: {float(r2[:, b].mean()):.3f} (min {float(r2[:, b].min()):.3f})" for b in range(k)
        )
        + f"; 1 - ε = {1 - result.epsilon:.2f}"
    )
    agreement = result.agreement()
    lines.append(
        f"rank agreement of distance and transfer gain over the {agreement['pairs']} pairs a != b: "
        f"Spearman ρ = {agreement['spearman']:.3f} (permutation p = {agreement['p_value']:.4f}; "
        "negative = closer tasks transfer better)"
    )
    lines.append(
        "closest source by distance / by transfer: "
        + ", ".join(
            f"{b}: {d}/{t}"
            for b, (d, t) in enumerate(
                zip(agreement["closest_by_distance"], agreement["closest_by_transfer"], strict=True)
            )
        )
        + f" (the same for {agreement['same_closest']} of {k} targets)"
    )
    return "\n".join(lines)
