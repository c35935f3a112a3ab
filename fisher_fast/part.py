"""Labelled data as every layer passes it around: a :class:`Part` of a data set, and the
stratified split that carves one part into two with the same class proportions.

This module sits below :mod:`fisher_fast.tasks` and :mod:`fisher_fast.nas` (it imports neither),
so that the tasks' data sources and splits, the searches' validation split and batches, and the
shared training helpers of :mod:`fisher_fast.training` all speak of the same container.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Part:
    """Inputs ``x`` (N, ...) and integer labels ``y`` (N,) of one part of a data set."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.y.dim() != 1 or self.y.dtype.is_floating_point or self.y.dtype == torch.bool:
            raise ValueError(
                f"labels must be integers of shape (N,), got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Part:
        """The same part with its tensors on ``device`` (itself when they are there already)."""
        return Part(self.x.to(device), self.y.to(device))


def stratified_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..N-1 into (held out, kept), holding out round(fraction * n_k) random
    samples of each label k (at least one when the label has two or more), so both sides keep
    the class proportions."""
    held, kept = [], []
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n = round(fraction * len(idx))
        n = max(n, 1) if len(idx) >= 2 else n
        held.append(idx[:n])
        kept.append(idx[n:])
    return torch.cat(held).sort().values, torch.cat(kept).sort().values
