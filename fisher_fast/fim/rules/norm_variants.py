"""Normalisation variants of other libraries that torch has no class for, verified (lookalike.py).

* **Normalisation followed by an activation** (timm's ``BatchNormAct2d``, ``GroupNormAct``,
  Hugging Face's ``BitGroupNormActivation``): a BatchNorm or GroupNorm subclass with an ``act``
  (or ``activation``) submodule and optionally a ``drop`` one, computing
  ``act(drop(norm(x)))``. The gradient at the affine output is the activation's vector-Jacobian
  product at the recomputed pre-activation, taken once for the whole batch: the activation
  treats every entry alone, so this equals the per-sample products stacked. It is one of
  torch's parameter-free elementwise activations, or a parameter-free module (Hugging Face's
  ``GELUActivation``, ``QuickGELUActivation``) verified to commute with a random permutation
  of its input's entries, which an activation that mixes entries (a softmax, a centring) fails.
* **Channels-first LayerNorm** (timm's ``LayerNorm2d``): an nn.LayerNorm subclass over one axis
  whose forward normalises axis 1 of an (N, C, H, W) input (a permute around F.layer_norm).

Each is recognised by the module's structure and then verified: its own forward must reproduce
the formula on a random input, so a variant with other math takes the exact generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, register_matched_rule
from fisher_fast.fim.rules.lookalike import reproduces
from fisher_fast.fim.rules.norm import (
    BatchNorm,
    affine_rule,
    batch_norm_without_affine,
    channel_positions,
    group_norm_without_affine,
)

# torch's parameter-free activations that act on each entry alone (Softmax and the like, GLU
# and the parametrised PReLU are left out).
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
_DROPOUTS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_BASES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
)  # fmt: skip


def _normalise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.GroupNorm):
        return group_norm_without_affine(module, x)
    return batch_norm_without_affine(module, x)


def _affine(module: nn.Module, x_hat: torch.Tensor) -> torch.Tensor:
    """x̂ ∘ weight + bias with the per-channel parameters on axis 1."""
    shape = (1, -1, *(1,) * (x_hat.dim() - 2))
    weight: torch.Tensor | None = getattr(module, "weight", None)
    bias: torch.Tensor | None = getattr(module, "bias", None)
    if weight is not None and bias is not None:  # one temporary, not two
        return torch.addcmul(bias.to(x_hat).reshape(shape), x_hat, weight.to(x_hat).reshape(shape))
    out = x_hat
    if weight is not None:
        out = out * weight.to(x_hat).reshape(shape)
    if bias is not None:
        out = out + bias.to(x_hat).reshape(shape)
    return out


def _activation(module: nn.Module) -> nn.Module | None:
    """The module's ``act`` submodule (timm), else its ``activation`` one (Hugging Face)."""
    for name in ("act", "activation"):
        act = getattr(module, name, None)
        if isinstance(act, nn.Module):
            return act
    return None


def _is_elementwise(module: nn.Module, act: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``act`` (parameter-free) acts on each entry alone: one of torch's elementwise
    activations, or a module whose output on a random input, its entries permuted at random,
    is its output on that input permuted the same way (checked once, for ``module``)."""
    if any(True for _ in act.parameters()):
        return False
    if type(act) in ELEMENTWISE_ACTIVATIONS:
        return True
    perm = torch.randperm(math.prod(shape), generator=torch.Generator().manual_seed(1))

    def permuted(x: torch.Tensor) -> torch.Tensor:
        return x.flatten()[perm.to(x.device)].reshape(shape)

    return reproduces(
        module,
        "elementwise activation",
        lambda x: permuted(act(x.clone())),
        shape,
        forward=lambda x: act(permuted(x)),
    )


def _is_norm_act(module: nn.Module) -> bool:
    """A BatchNorm/GroupNorm subclass with its own forward, an elementwise ``act`` (or
    ``activation``) and an optional parameter-free ``drop``, eval mode, affine, whose forward is
    act(drop(norm(x)))."""
    act, drop = _activation(module), getattr(module, "drop", nn.Identity())
    if not isinstance(module, _NORMS) or type(module).forward in (b.forward for b in _BASES):
        return False
    if module.training or act is None or type(drop) not in _DROPOUTS:
        return False
    if getattr(module, "weight", None) is None:
        return False
    if isinstance(module, BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return False
        channels = module.num_features
        spatial = (
            0
            if isinstance(module, nn.BatchNorm1d)
            else 3
            if isinstance(module, nn.BatchNorm3d)
            else 2
        )
    else:
        assert isinstance(module, nn.GroupNorm)
        channels, spatial = module.num_channels, 2
    shape = (2, channels, *(3,) * spatial)
    if not _is_elementwise(module, act, shape):
        return False

    def reference(x: torch.Tensor) -> torch.Tensor:
        return act(_affine(module, _normalise(module, x)))

    return reproduces(module, "norm then activation", reference, shape)


# The activation's vector-Jacobian product (activation, input z, output gradient g) by its own
# backward op, for the common ones: no autograd graph and no copy of z for in-place activations.
_BACKWARD: dict[type[nn.Module], Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Identity: lambda act, z, g: g,
    nn.ReLU: lambda act, z, g: torch.ops.aten.threshold_backward(g, z, 0),
    nn.SiLU: lambda act, z, g: torch.ops.aten.silu_backward(g, z),
    nn.GELU: lambda act, z, g: torch.ops.aten.gelu_backward(g, z, approximate=act.approximate),
    nn.Hardswish: lambda act, z, g: torch.ops.aten.hardswish_backward(g, z),
}


def _pre_activation_grad(
    module: nn.Module, c: Call, x_hat: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The gradient at the affine output: the activation's VJP at the recomputed input."""
    act = _activation(module)
    assert act is not None
    z = _affine(module, x_hat)
    g = c.grad().to(z.dtype)
    backward = _BACKWARD.get(type(act))
    if backward is not None:
        return backward(act, z, g).to(dtype)
    with torch.enable_grad():
        z.requires_grad_(True)
        out = act(z.clone())  # a copy: the activation may work in place
        (grad,) = torch.autograd.grad(out, z, g)
    return grad.to(dtype)


def _norm_act_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    affine_rule(_normalise, channel_positions, affine_grad=_pre_activation_grad)(module, calls, ctx)


def _layer_norm_channels_first(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ of a LayerNorm over axis 1 (the channels) of x."""
    assert isinstance(module, nn.LayerNorm)
    y = F.layer_norm(x.movedim(1, -1), module.normalized_shape, None, None, module.eps)
    return y.movedim(-1, 1)


def _is_channels_first_layer_norm(module: nn.Module) -> bool:
    """An nn.LayerNorm subclass over one axis whose forward normalises axis 1 of (N, C, H, W)."""
    if not isinstance(module, nn.LayerNorm) or type(module).forward is nn.LayerNorm.forward:
        return False
    if len(module.normalized_shape) != 1 or module.weight is None:
        return False
    shape = (2, module.normalized_shape[0], 3, 4)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return _affine(module, _layer_norm_channels_first(module, x))

    return reproduces(module, "channels-first layer norm", reference, shape)


def _channels_first_layer_norm_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    affine_rule(_layer_norm_channels_first, channel_positions)(module, calls, ctx)


register_matched_rule(_is_norm_act, RuleSpec(_norm_act_rule))
register_matched_rule(_is_channels_first_layer_norm, RuleSpec(_channels_first_layer_norm_rule))
