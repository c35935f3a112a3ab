"""The ten candidate operations of the paper's appendix A, as shape-preserving modules.

Every operation maps ``(N, C_in, H, W)`` to ``(N, C_out, ceil(H / stride), ceil(W / stride))``
with ``stride`` 1 (normal cells, where ``C_in == C_out`` keeps the shape) or 2 (the edges leaving
a reduction cell's input). Convolutions follow the DARTS/NAS-Bench-201 cell convention
ReLU -> conv (no bias) -> BatchNorm: the ReLU makes a sum of edges non-linear even when every
edge is a plain convolution, and the BatchNorm keeps the scale of summed edges comparable. The
convolutions are plain (not depthwise-separable, unlike DARTS), which is what the paper's list
names; the dilated ones use dilation 2 (receptive fields 5x5 and 9x9). Every layer is an ``nn.Conv2d`` or ``nn.BatchNorm2d`` and so has a per-layer
``fisher_fast.diag_fim`` rule. Operations that change the shape but have no weights of their own
(identity, pooling) get a 1x1 ReLU-conv-BN projection, a strided 1x1 convolution rather than
DARTS's factorised reduce so that odd sizes (7x7, 5x5) halve like every other operation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ZERO = "zero"
"""The operation that removes an edge."""


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv2d(kernel, stride, dilation, 'same'-style padding, no bias) -> BatchNorm2d.

    ``kernel`` and ``stride`` are (height, width) pairs; padding ``dilation * (k - 1) / 2`` per
    axis keeps the size at stride 1 and gives ``ceil(size / 2)`` at stride 2 (odd kernels).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        dilation: int = 1,
    ) -> None:
        padding = (dilation * (kernel[0] - 1) // 2, dilation * (kernel[1] - 1) // 2)
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out),
        )


class Conv7x1Then1x7(nn.Sequential):
    """ReLU -> conv 7x1 -> conv 1x7 -> BatchNorm2d: a 7x7 receptive field with 14 C² weights
    instead of 49 C². At stride 2 each convolution halves the axis it spans."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, (7, 1), (stride, 1), (3, 0), bias=False),
            nn.Conv2d(c_out, c_out, (1, 7), (1, stride), (0, 3), bias=False),
            nn.BatchNorm2d(c_out),
        )


class Zero(nn.Module):
    """The absent edge: zeros of the output shape ``(N, C_out, ceil(H / s), ceil(W / s))``."""

    def __init__(self, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.c_out, -(-h // s), -(-w // s))


def _reshape(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a strided 1x1 ReLU-conv-BN projection."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return ReLUConvBN(c_in, c_out, (1, 1), (stride, stride))


def _pool(pool: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """3x3 pooling (padding 1, so sizes match the convolutions), then a 1x1 projection if the
    number of channels changes."""
    if c_in == c_out:
        return pool
    return nn.Sequential(pool, _reshape(c_in, c_out, 1))


def _conv(kernel: int, dilation: int = 1) -> Callable[[int, int, int], nn.Module]:
    return lambda c_in, c_out, s: ReLUConvBN(c_in, c_out, (kernel, kernel), (s, s), dilation)


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    ZERO: lambda c_in, c_out, s: Zero(c_out, s),
    "identity": _reshape,
    "max_pool_3x3": lambda c_in, c_out, s: _pool(nn.MaxPool2d(3, s, 1), c_in, c_out),
    "avg_pool_3x3": lambda c_in, c_out, s: _pool(
        nn.AvgPool2d(3, s, 1, count_include_pad=False), c_in, c_out
    ),
    "conv_3x3": _conv(3),
    "conv_5x5": _conv(5),
    "conv_7x7": _conv(7),
    "dil_conv_3x3": _conv(3, dilation=2),
    "dil_conv_5x5": _conv(5, dilation=2),
    "conv_7x1_1x7": lambda c_in, c_out, s: Conv7x1Then1x7(c_in, c_out, s),
}

OPERATIONS: tuple[str, ...] = tuple(_BUILDERS)
"""Names of the appendix-A operations, in the paper's order (also the order of canonical lists)."""


def check_operation(name: str) -> None:
    """Raise a ValueError naming the known operations if ``name`` is not one of them."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown operation {name!r}; choose one of {', '.join(OPERATIONS)}")


def make_operation(name: str, c_in: int, c_out: int, stride: int = 1) -> nn.Module:
    """A fresh module for operation ``name``: ``(N, c_in, H, W) -> (N, c_out, ceil(H/stride),
    ceil(W/stride))``. ``stride`` is 1 (normal cell) or 2 (reduction cell)."""
    check_operation(name)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 (normal cell) or 2 (reduction cell), got {stride}")
    if c_in < 1 or c_out < 1:
        raise ValueError(f"channel counts must be positive, got c_in={c_in}, c_out={c_out}")
    return _BUILDERS[name](c_in, c_out, stride)
