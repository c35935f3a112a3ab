"""FUSE's relaxation (Algorithm 1, line 3): the candidates' outputs mixed by softmax(α)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Mixture(nn.Module):
    """``K`` candidate classifiers and ``K`` architecture logits ``alpha`` (all zero at the start,
    so every candidate weighs ``1 / K``, Algorithm 1 line 2).

    ``forward(x)`` is ``Σ_k softmax(α)_k · net_k(x)``: ``(N, C, H, W) -> (N, num_classes)``
    mixed logits. The candidates' weights and ``alpha`` are separate parameter groups
    (:meth:`weights`, ``alpha``) because FUSE updates them on different data.
    """

    def __init__(self, candidates: Sequence[nn.Module]) -> None:
        super().__init__()
        if not candidates:
            raise ValueError("a mixture needs at least one candidate network")
        self.candidates = nn.ModuleList(candidates)
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.outputs(x))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every candidate's logits, stacked: ``(K, N, num_classes)``."""
        return torch.stack([net(x) for net in self.candidates])

    def mix(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(K, N, num_classes)`` candidate logits -> ``(N, num_classes)`` mixed by softmax(α).
        Separate from :meth:`outputs` so an α step can compute the outputs without gradients
        (α's gradient needs only the outputs, not a backward pass through the networks)."""
        return torch.einsum("k,knc->nc", self.alpha.softmax(0), outputs)

    def weights(self) -> list[nn.Parameter]:
        """The candidates' parameters (everything except ``alpha``)."""
        return list(self.candidates.parameters())

    def probabilities(self) -> torch.Tensor:
        """``softmax(α)``, detached: ``(K,)`` mixing weights that sum to 1."""
        return self.alpha.detach().softmax(0)
