"""Class mapping and balancing rules (paper §4: "for each task, we consider a balanced data set").

* Mapping: task label k collects the original labels of the task's k-th class; with an
  "anything else" class, every other original label becomes the last task label; without one,
  samples of other labels are left out.
* Balancing: named classes keep all their samples; the "anything else" class is subsampled
  (seeded, without replacement) to the mean size of the named classes. For a binary detector
  (one named class plus "anything else") that is the paper's rule: all positives and an equal
  number of random negatives. Tasks without "anything else" (e.g. all ten digits) are kept whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DROPPED = -1


def task_labels(y: torch.Tensor, groups: Sequence[Sequence[int]], other: bool) -> torch.Tensor:
    """Task label of each sample, (N,) int64: k for original labels in ``groups[k]``,
    ``len(groups)`` for the rest when ``other``, else ``DROPPED`` (-1)."""
    out = torch.full_like(y, len(groups) if other else DROPPED, dtype=torch.long)
    for k, group in enumerate(groups):
        out[torch.isin(y, torch.tensor(list(group), dtype=y.dtype))] = k
    return out


def balanced_indices(
    labels: torch.Tensor, num_named: int, other: bool, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the samples a balanced task keeps (sorted), from task labels (N,).

    Every sample of the named classes 0..num_named-1; of the "anything else" class (label
    ``num_named``, when ``other``) a seeded random subset of round(mean named-class size)
    samples, or all of them when there are fewer.
    """
    named = ((labels >= 0) & (labels < num_named)).nonzero().squeeze(1)
    if not other:
        return named
    rest = (labels == num_named).nonzero().squeeze(1)
    size = round(len(named) / num_named)
    chosen = rest[torch.randperm(len(rest), generator=generator)[:size]]
    return torch.cat([named, chosen]).sort().values
