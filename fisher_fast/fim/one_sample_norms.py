"""Batches of one sample through norms that no rule taps (frozen, or without parameters).

PyTorch's CPU BatchNorm and InstanceNorm backward in eval mode return a wrong input gradient for
a batch of one sample when the gradient at their output has some strides (a transpose after the
norm, as in LeViT, XCiT and lambda layers: ``norm(x).flatten(2).transpose(1, 2)``). That wrong
gradient then reaches every parameter before the norm, silently. A norm with trainable
parameters is tapped, and its tap makes the gradient contiguous for a batch of one
(capture.py); a norm whose parameters are frozen, or that has none (``affine=False``), is not
tapped, so here a tensor hook on its output does the same.

The hook is registered only in the engine's own forward passes of a batch of one sample
(``samples(1)``): other batches pay nothing. A tensor hook, not an autograd Function, so that an
in-place op after the norm (timm's ``ReLU(inplace=True)``) stays legal. The generic path's
re-runs of a module one sample at a time (fallback.py, where vmap cannot run it) take the same
hooks from ``contiguous_norm_gradients``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fisher_fast.fim.sample_scope import SampleScoped


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (_BatchNorm, _InstanceNorm))]


def _make_contiguous(output: Any) -> None:
    """Have the gradient at a norm's output made contiguous on its way back."""
    if isinstance(output, torch.Tensor) and output.requires_grad and output.dim() > 1:
        output.register_hook(_contiguous)


@contextlib.contextmanager
def contiguous_norm_gradients(module: nn.Module) -> Iterator[None]:
    """While the block runs, every BatchNorm and InstanceNorm in ``module`` has the gradient at
    its output made contiguous: for passes of one sample outside the engine's own."""
    handles = [
        norm.register_forward_hook(lambda _norm, _args, out: _make_contiguous(out))
        for norm in _norms(module)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class OneSampleNorms(SampleScoped):
    """Forward hooks on every BatchNorm and InstanceNorm of a model, while ``installed()``, that
    make the gradient at the norm's output contiguous when the pass is of one sample."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._norms = _norms(model)
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self._handles = [m.register_forward_hook(self._hook) for m in self._norms]
        with super().installed():
            yield

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.n == 1:
            _make_contiguous(output)
