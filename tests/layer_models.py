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
