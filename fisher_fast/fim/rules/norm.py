"""Normalisation layers: BatchNorm (eval), LayerNorm, GroupNorm, InstanceNorm (affine).

For y = x̂ ∘ weight + bias, the per-sample gradients are sum over positions of g ∘ x̂ (weight)
and of g (bias), where x̂ is the normalised input. x̂ is recomputed from the input with the
layer's own functional form without the affine part, so every variant's statistics are used
exactly as in its forward pass. BatchNorm must use running statistics (eval mode): batch
statistics couple the samples and make per-sample gradients undefined.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.fim.rules import Call, RuleContext, register_rule

BatchNorm = nn.modules.batchnorm._BatchNorm

BATCHNORM_TRAINING_ERROR = (
    "{name} is a BatchNorm layer in training mode (or without running statistics), so its output "
    "for one sample depends on the other samples in the batch and per-sample gradients are not "
    "defined. Call model.eval() (diag_fim does this unless mode='keep'), and keep "
    "track_running_stats=True."
)


# (module, call, x̂ in the work dtype, work dtype) -> the gradient at weight ∘ x̂ + bias
AffineGrad = Callable[[nn.Module, Call, torch.Tensor, torch.dtype], torch.Tensor]


def _output_grad(
    module: nn.Module, c: Call, x_hat: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return c.grad().to(dtype)


def affine_rule(
    normalise: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    reduce_dims: Callable[[torch.Tensor], tuple[int, ...]],
    cast_input: bool = True,
    affine_grad: AffineGrad = _output_grad,
) -> Callable[[nn.Module, list[Call], RuleContext], None]:
    """A rule for y = normalise(x) * weight + bias; reduce_dims(x) are the position axes.
    ``normalise`` gets x in the work dtype, or as the module got it (``cast_input=False``);
    ``affine_grad`` gives the gradient at the affine output (by default the module's output
    gradient; a layer with an activation after it maps its output gradient back)."""

    def rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        want_weight = weight is not None and weight.requires_grad
        want_bias = bias is not None and bias.requires_grad
        weight_sum: torch.Tensor | None = None  # per-sample gradients, summed over calls
        bias_sum: torch.Tensor | None = None
        for c in calls:  # x̂ and the affine gradient once per call, for both parameters
            dims = reduce_dims(c.input)
            if want_weight or affine_grad is not _output_grad:
                x = c.input.to(ctx.work_dtype) if cast_input else c.input
                x_hat = normalise(module, x).to(ctx.work_dtype)
                g = affine_grad(module, c, x_hat, ctx.work_dtype)
                del x
            else:  # the bias alone needs no x̂
                x_hat, g = None, c.grad().to(ctx.work_dtype)
            if want_weight:
                assert x_hat is not None
                part = _sum_positions(g * x_hat, dims)
                weight_sum = part if weight_sum is None else weight_sum + part
            del x_hat
            if want_bias:
                part = _sum_positions(g, dims)
                bias_sum = part if bias_sum is None else bias_sum + part
        if weight_sum is not None:
            ctx.add_bias("weight", weight_sum)
        if bias_sum is not None:
            ctx.add_bias("bias", bias_sum)

    # Named after the normalisation, as the handling paths show it ("rule batch_norm_rule").
    rule.__name__ = normalise.__name__.removesuffix("_without_affine").strip("_") + "_rule"
    return rule


def _sum_positions(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum over the position axes; none (e.g. BatchNorm1d on (N, C)) leaves t as it is
    (``t.sum(())`` would sum over everything)."""
    return t.sum(dims) if dims else t


def channel_positions(x: torch.Tensor) -> tuple[int, ...]:
    """Every axis but samples (0) and channels (1)."""
    return tuple(range(2, x.dim()))


def batch_norm_without_affine(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, BatchNorm)
    mean, var = module.running_mean, module.running_var
    if module.training or mean is None or var is None:
        raise RuntimeError(BATCHNORM_TRAINING_ERROR.format(name=type(module).__name__))
    return F.batch_norm(x, mean.to(x), var.to(x), None, None, False, 0.0, module.eps)


def _instance_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
    use_running = not module.training and module.track_running_stats
    mean = module.running_mean.to(x) if use_running and module.running_mean is not None else None
    var = module.running_var.to(x) if use_running and module.running_var is not None else None
    return F.instance_norm(x, mean, var, None, None, not use_running, 0.0, module.eps)


def group_norm_without_affine(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.GroupNorm)
    return F.group_norm(x, module.num_groups, None, None, module.eps)


def _layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.LayerNorm)
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def layer_positions(x: torch.Tensor, n_normalised: int) -> tuple[int, ...]:
    return tuple(range(1, x.dim() - n_normalised))


def _layer_norm_rule(module: nn.LayerNorm, calls: list[Call], ctx: RuleContext) -> None:
    dims = len(module.normalized_shape)
    affine_rule(_layer_norm, lambda x: layer_positions(x, dims))(module, calls, ctx)


def channels_example(spatial: int) -> Callable[[nn.Module], tuple[int, ...]]:
    """The shape of a check input (lookalike.py): 2 samples, the channels, ``spatial`` axes."""

    def example(module: nn.Module) -> tuple[int, ...]:
        channels = getattr(module, "num_features", 0) or getattr(module, "num_channels", 1)
        return (2, int(channels), *(3,) * spatial)

    return example


def layer_example(module: nn.Module) -> tuple[int, ...]:
    """2 samples of 3 positions of the normalised shape."""
    assert isinstance(module, (nn.LayerNorm, nn.RMSNorm))
    return (2, 3, *module.normalized_shape)


_SPATIAL: list[tuple[type[nn.Module], int]] = [
    (nn.BatchNorm1d, 0), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3),
    (nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3),
]  # fmt: skip
for _cls, _spatial in _SPATIAL:
    _normalise = batch_norm_without_affine if issubclass(_cls, BatchNorm) else _instance_norm
    register_rule(_cls, example=channels_example(_spatial))(
        affine_rule(_normalise, channel_positions)
    )
register_rule(nn.GroupNorm, example=channels_example(2))(
    affine_rule(group_norm_without_affine, channel_positions)
)
register_rule(nn.LayerNorm, layout="positionwise", example=layer_example)(_layer_norm_rule)
