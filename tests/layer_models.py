"""Small modules shared by several test modules (imported from here, not from each other)."""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """A layer with no rule: goes through the torch.func fallback."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features))
        self.shift = nn.Parameter(torch.randn(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x * self.scale) + self.shift


class SqrtHead(nn.Module):
    """Linear (4 -> 3), sqrt(|.|), Linear (3 -> 3): the gradient at ``body``'s output is NaN
    wherever that output is 0 (d sqrt(|u|)/du = inf times 0), so zeroed ``body`` weights make
    the Fisher of ``body`` non-finite while ``head``'s stays finite."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sqrt(self.body(x).abs()))


class RoutedExperts(nn.Module):
    """A shared expert on every sample, and a routed one added for the samples whose first
    feature is positive (data-dependent dispatch on a subset of the batch)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.shared, self.routed = nn.Linear(features, classes), nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        to_routed = x[:, 0] > 0
        if bool(to_routed.any()):
            out = out.index_put((to_routed,), out[to_routed] + self.routed(x[to_routed]))
        return out
