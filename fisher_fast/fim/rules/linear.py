"""nn.Linear with any number of leading axes.

Input (N, *, I), output gradient (N, *, O). The per-sample weight gradient is
sum_t g_t x_t^T over the extra axes t; with no extra axes and a single call it factors and
costs one matrix product, (g∘g)^T (x∘x), whose g∘g also gives the bias. The bias gradient is
sum_t g_t. With several backward passes per batch (the "mc" and "exact" kinds), x is the same in
every pass, so the factored form adds up the passes' g∘g and takes one product per batch.
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast import ops
from fisher_fast.fim.rules import Call, RuleContext, joined, register_rule, sum_over_calls


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(N, *, F) -> (N, T, F) with T the product of the extra axes (1 when there are none)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _example(module: nn.Linear) -> tuple[int, ...]:
    """2 samples of 3 positions (a check input for subclasses, lookalike.py)."""
    return (2, 3, module.in_features)


@register_rule(nn.Linear, layout="positionwise", example=_example)
def linear_rule(module: nn.Linear, calls: list[Call], ctx: RuleContext) -> None:
    xs = [_positions(c.input) for c in calls]
    gs = [_positions(c.grad()) for c in calls]
    # Calls are positions of one per-sample sum, so weight sharing is a concatenation along T.
    x = joined(xs, dim=1)
    g = joined(gs, dim=1)
    if g.shape[1] == 1:
        g2 = _squares_over_passes(calls[0], g[:, 0], ctx)
        if g2 is not None:
            _factored(module, g2, x[:, 0], ctx)
        return
    if module.weight.requires_grad:
        ctx.add("weight", ctx.square_sum(g.unsqueeze(1), x.unsqueeze(1))[0])
    if module.bias is not None and module.bias.requires_grad:
        ctx.add_bias(
            "bias", sum_over_calls(calls, lambda c: _positions(c.grad()).to(ctx.work_dtype).sum(1))
        )


def _squares_over_passes(call: Call, g: torch.Tensor, ctx: RuleContext) -> torch.Tensor | None:
    """What the last pass hands to the product: with one pass, g itself (squared by the product);
    with several, g∘g summed over them, (N, O) in the work dtype. None before the last pass."""
    if ctx.passes.count == 1:
        return g
    g2 = g.to(ctx.work_dtype).square()
    if ctx.passes.index > 0:
        g2 += call.saved.pop("g2")
    if not ctx.passes.last:
        call.saved["g2"] = g2
        return None
    return g2


def _factored(module: nn.Linear, g: torch.Tensor, x: torch.Tensor, ctx: RuleContext) -> None:
    """One call without extra axes, x (N, I) and g (N, O) the output gradient, or its square
    summed over passes when there are several: the per-sample weight gradient g_n x_n^T squares
    to (g_n∘g_n)(x_n∘x_n)^T, so the sum over samples is one matrix product, and the bias's is the
    column sum of the same g∘g. Both are added into the accumulator in place; on CPU the kernels
    backend also keeps the squares out of fresh memory."""
    squared = ctx.passes.count > 1
    weight = ctx.target("weight") if module.weight.requires_grad else None
    bias = ctx.target("bias") if module.bias is not None and module.bias.requires_grad else None
    if weight is None and bias is None:
        return
    if ctx.backend == "kernels" and g.device.type == "cpu":
        # Squares summed over passes are in the work dtype, the input in the model's.
        ops.linear_sq_sum_(weight, bias, g, x.to(g.dtype), g_squared=squared)
        return
    g2 = g if squared else g.to(ctx.work_dtype).square()
    if weight is not None:
        weight.addmm_(g2.t(), x.to(ctx.work_dtype).square())
    if bias is not None:
        bias.add_(g2.sum(0))
