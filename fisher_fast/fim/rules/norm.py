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

from fisher_fast.fim.rules import Call, RuleContext, register_rule, sum_over_calls

BATCHNORM_TRAINING_ERROR = (
    "{name} is a BatchNorm layer in training mode (or without running statistics), so its output "
    "for one sample depends on the other samples in the batch and per-sample gradients are not "
    "defined. Call model.eval() (diag_fim does this unless mode='keep'), and keep "
    "track_running_stats=True."
)


def affine_rule(
    normalise: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    reduce_dims: Callable[[torch.Tensor], tuple[int, ...]],
    cast_input: bool = True,
) -> Callable[[nn.Module, list[Call], RuleContext], None]:
    """A rule for y = normalise(x) * weight + bias; reduce_dims(x) are the position axes.
    ``normalise`` gets x in the work dtype, or as the module got it (``cast_input=False``)."""

    def rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
        def weight_grad(c: Call) -> torch.Tensor:
            x = c.input.to(ctx.work_dtype) if cast_input else c.input
            x_hat = normalise(module, x).to(ctx.work_dtype)
            return _sum_positions(c.grad().to(ctx.work_dtype) * x_hat, reduce_dims(c.input))

        def bias_grad(c: Call) -> torch.Tensor:
            return _sum_positions(c.grad().to(ctx.work_dtype), reduce_dims(c.input))

        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if weight is not None and weight.requires_grad:
            ctx.add_bias("weight", sum_over_calls(calls, weight_grad))
        if bias is not None and bias.requires_grad:
            ctx.add_bias("bias", sum_over_calls(calls, bias_grad))

    return rule


def _sum_positions(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum over the position axes; none (e.g. BatchNorm1d on (N, C)) leaves t as it is
    (``t.sum(())`` would sum over everything)."""
    return t.sum(dims) if dims else t


def _channel_positions(x: torch.Tensor) -> tuple[int, ...]:
    """Every axis but samples (0) and channels (1)."""
    return tuple(range(2, x.dim()))


def _batch_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
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


def _group_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
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


register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)(
    affine_rule(_batch_norm, _channel_positions)
)
register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)(
    affine_rule(_instance_norm, _channel_positions)
)
register_rule(nn.GroupNorm)(affine_rule(_group_norm, _channel_positions))
register_rule(nn.LayerNorm, layout="positionwise")(_layer_norm_rule)
