"""The §4.1 task-distance study on an embedded suite: every small probe family with the exact
and the empirical Fisher, 5 seeds, as in the README's tables and figures.

Runs ``distance_matrix`` for each (family, Fisher kind) into ``runs/<suite>-<arch>`` (cached: a
rerun recomputes nothing), copies each figure to ``docs/figures/<suite>-<arch>-<fisher>.png``
and prints the markdown tables (mean ± standard deviation over seeds, the closest source of each
target column in bold) and the mean probe test accuracies.

    python scripts/task_study.py [--suite digits] [--seeds 5] [--archs mlp cnn resnet]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from fisher_fast.tasks import SMALL_PROBES, DistanceResult, distance_matrix, get_suite

FISHERS = ("exact", "empirical")


def markdown_rows(arch: str, result: DistanceResult) -> list[str]:
    """One table row per source task: ``| arch: a | d[a, 0] | ... |``, the closest source of
    each target column in bold (the diagonal is 0 by definition)."""
    mean, std = result.mean, result.std
    k = mean.shape[0]
    off = mean + torch.diag(torch.full((k,), float("inf"), dtype=mean.dtype))
    closest = off.argmin(0)
    rows = []
    for a in range(k):
        cells = []
        for b in range(k):
            if a == b:
                cells.append("0")
                continue
            text = f"{float(mean[a, b]):.3f} ± {float(std[a, b]):.3f}"
            cells.append(f"**{text}**" if int(closest[b]) == a else text)
        rows.append(f"| {arch}: {a} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="digits")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=list(SMALL_PROBES), choices=SMALL_PROBES)
    args = parser.parse_args()
    suite = get_suite(args.suite)
    tables: dict[str, list[str]] = {f: [] for f in FISHERS}
    accuracies = []
    for arch in args.archs:
        for fisher in FISHERS:
            out = Path("runs") / f"{args.suite}-{arch}"
            start = time.perf_counter()
            result = distance_matrix(suite, arch, seeds=args.seeds, fisher=fisher, out=out)
            print(f"{arch} {fisher}: {time.perf_counter() - start:.1f} s")
            figure = Path("docs/figures") / f"{args.suite}-{arch}-{fisher}.png"
            figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f"distance-{fisher}.png", figure)
            tables[fisher] += markdown_rows(arch, result)
        accuracy = ", ".join(f"{float(a):.3f}" for a in result.test_accuracy.mean(0))
        accuracies.append(f"{arch} {accuracy}")
    k = len(suite.tasks)
    for fisher in FISHERS:
        print(f"\n| {fisher} Fisher | " + " | ".join(f"→ {b}" for b in range(k)) + " |")
        print("|---" * (k + 1) + "|")
        print("\n".join(tables[fisher]))
    print("\nMean probe test accuracy per task: " + "; ".join(accuracies))


if __name__ == "__main__":
    main()
