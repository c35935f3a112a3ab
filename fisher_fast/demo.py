"""A short end-to-end demonstration on embedded data: task distances between digits tasks.

The digits suite (:func:`fisher_fast.tasks.suites.digits_suite`: the paper's MNIST tasks of §4.1
on scikit-learn's 8x8 digits) with one MLP probe per task and one seed, through
:func:`fisher_fast.tasks.distance_matrix` with the exact Fisher (each network's own predictive
distribution, so label meanings need not agree between tasks). ``fisher-fast distance`` runs the
full study (several seeds and probes, a cached run directory, figures).
"""

from __future__ import annotations

from dataclasses import replace

import torch

import fisher_fast
from fisher_fast.tasks import distance_matrix, format_matrix
from fisher_fast.tasks.cli import set_threads
from fisher_fast.tasks.suites import digits_suite


def run_demo(seed: int = 0, epochs: int | None = None, progress: bool = True) -> torch.Tensor:
    """Train the four probes, print accuracies and the distance matrix; return the (4, 4) matrix
    d[source, target]. ``epochs`` defaults to the digits suite's setting."""
    suite = digits_suite()
    set_threads(None, suite.default_arch)
    print(
        "fisher_fast",
        fisher_fast.__version__,
        fisher_fast.build_info() if fisher_fast.is_loaded() else "(no compiled library)",
    )
    train = suite.train if epochs is None else replace(suite.train, epochs=epochs)
    for i, task in enumerate(suite.tasks):
        splits = task.splits()
        print(
            f"task {i} ({task.name}): {len(splits.train)} train / {len(splits.val)} validation / {len(splits.test)} test samples"
        )
    result = distance_matrix(
        suite, suite.default_arch, seeds=[seed], train=train, progress=progress
    )
    print(format_matrix(result))
    return result.mean
