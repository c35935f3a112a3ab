"""The transposed Linear of GPT-2-style models (Hugging Face ``Conv1D``): y = x W + b, W (I, O).

The per-sample weight gradient is sum_t x_t g_tᵀ, the transpose of nn.Linear's, so the same
products are used and transposed back: (x∘x)ᵀ(g∘g) for one position, ``ctx.square_sum`` for
sequences (x and g in the work dtype, a bfloat16 model's as they are on the triton backend:
triton_products.operands); the bias's is sum_t g_t. Recognised by class name and module
(transformers is not imported), and by the weight's shape matching ``nf`` outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.fim import triton_products
from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, joined, register_matched_rule


def _is_transposed_linear(module: nn.Module) -> bool:
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def _positions(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def transposed_linear_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    work = ctx.work_dtype
    x = joined([_positions(c.input) for c in calls], dim=1)
    g = joined([_positions(c.grad()) for c in calls], dim=1)
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.requires_grad:
        if g.shape[1] == 1:
            squares = x[:, 0].to(work).square().t().mm(g[:, 0].to(work).square())
        else:
            g_in, x_in = triton_products.operands(g, x, work, ctx.backend)
            squares = ctx.square_sum(g_in.unsqueeze(1), x_in.unsqueeze(1))[0].t()
        ctx.add("weight", squares.to(ctx.acc_dtype))
    if bias is not None and bias.requires_grad:
        ctx.add_bias("bias", g.to(work).sum(1))


register_matched_rule(
    _is_transposed_linear, RuleSpec(transposed_linear_rule, layout="positionwise")
)
