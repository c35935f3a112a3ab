"""The per-sample losses the benchmarks hand to diag_fim and the peers, (N,) each."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A language model's: cross-entropy of logits (N, T, V) against targets (N, T), summed
    over the positions."""
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def class_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A classifier's: cross-entropy of logits (N, C) against labels (N,)."""
    return F.cross_entropy(out, y, reduction="none")
