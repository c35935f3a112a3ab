"""nn.Linear with any number of leading axes.

Input (N, *, I), output gradient (N, *, O). The per-sample weight gradient is
sum_t g_t x_t^T over the extra axes t; with no extra axes and a single call it factors and
costs one matrix product, (g∘g)^T (x∘x), whose g∘g also gives the bias. The bias gradient is
sum_t g_t.
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast import ops
from fisher_fast.fim.rules import Call, RuleContext, register_rule, sum_over_calls


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(N, *, F) -> (N, T, F) with T the product of the extra axes (1 when there are none)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, calls: list[Call], ctx: RuleContext) -> None:
    xs = [_positions(c.input) for c in calls]
    gs = [_positions(c.grad()) for c in calls]
    # Calls are positions of one per-sample sum, so weight sharing is a concatenation along T.
    x = torch.cat(xs, dim=1) if len(xs) > 1 else xs[0]
    g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
    if g.shape[1] == 1:
        _factored(module, g[:, 0], x[:, 0], ctx)
        return
    if module.weight.requires_grad:
        ctx.add("weight", ctx.square_sum(g.unsqueeze(1), x.unsqueeze(1))[0])
    if module.bias is not None and module.bias.requires_grad:
        ctx.add_bias(
            "bias", sum_over_calls(calls, lambda c: _positions(c.grad()).to(ctx.work_dtype).sum(1))
        )


def _factored(module: nn.Linear, g: torch.Tensor, x: torch.Tensor, ctx: RuleContext) -> None:
    """One call without extra axes, g (N, O), x (N, I): the per-sample weight gradient g_n x_n^T
    squares to (g_n∘g_n)(x_n∘x_n)^T, so the sum over samples is one matrix product, and the
    bias's is the column sum of the same g∘g (squared once for both). Both are added into the
    accumulator in place; on CPU the kernels backend also keeps the squares out of fresh memory."""
    weight = ctx.target("weight") if module.weight.requires_grad else None
    bias = ctx.target("bias") if module.bias is not None and module.bias.requires_grad else None
    if weight is None and bias is None:
        return
    if ctx.backend == "kernels" and g.device.type == "cpu":
        ops.linear_sq_sum_(weight, bias, g, x)
        return
    g2 = g.to(ctx.work_dtype).square()
    if weight is not None:
        weight.addmm_(g2.t(), x.to(ctx.work_dtype).square())
    if bias is not None:
        bias.add_(g2.sum(0))
