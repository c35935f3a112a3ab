"""nn.MultiheadAttention (packed projections, no bias_k/v, no zero attention).

MultiheadAttention uses ``out_proj``'s weight without calling ``out_proj``, so the generic path
would have to re-run the module per sample with torch.func. Instead, with

    q, k, v = x_q W_q^T + b_q, ...;   a = attention(q, k, v);   out = a W_o^T + b_o

the projection weights reduce to the Linear math (sum_t g_t x_t^T per sample, squared and summed
by ``ctx.square_sum``) once dL/dq, dL/dk, dL/dv and dL/dout are known. Two ways to get them:

* instrumented forward (``instrument``, used when the attention weights are not requested, as in
  nn.TransformerEncoderLayer): diag_fim runs this decomposed forward in place of the module's,
  tapping q, k, v and out, so the model's own backward delivers their gradients for free;
* otherwise, one batched recompute with autograd on q, k, v only (attention mixes positions but
  never samples, so a batched backward gives per-sample gradients).

The recompute runs in the work dtype (float32 or float64). The instrumented tensors are the
model's own; the products take them in the work dtype, except a bfloat16 model's on the triton
backend, which stay bfloat16 (triton_products.operands: exact products, float32 accumulation).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.fim import triton_products
from fisher_fast.fim.layout import Broadcast, CallLayout, Sampled
from fisher_fast.fim.rules import Call, RuleContext, joined, register_rule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def supports(module: nn.Module) -> bool:
    """Configurations this rule reproduces exactly; others use the generic fallback."""
    assert isinstance(module, nn.MultiheadAttention)
    return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf")
    )


def _attention_mask(
    module: nn.MultiheadAttention, args: dict, n: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive (N, heads, L, S)-broadcastable mask from attn_mask and key_padding_mask."""
    h = module.num_heads
    mask = _float_mask(args.get("attn_mask"), dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(n, h, *mask.shape[1:])
    padding = _float_mask(args.get("key_padding_mask"), dtype)
    if padding is not None:
        padding = padding.view(n, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask


def _projection_grads(
    module: nn.MultiheadAttention, call: Call, work: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per call: inputs [x_q, x_k, x_v], their projections' gradients [g_q, g_k, g_v], the
    attention output a (input of out_proj) and the output gradient, all batch-first (N, T, E)."""
    bound = _SIGNATURE.bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    args = bound.arguments
    xs = [args["query"], args["key"], args["value"]]
    grad_out = call.grad(0)
    grad_weights = call.grads[1] if len(call.grads) > 1 else None
    if not module.batch_first:
        xs = [x.transpose(0, 1) for x in xs]
        grad_out = grad_out.transpose(0, 1)
    xs = [x.to(work) for x in xs]
    n, e, h = xs[0].shape[0], module.embed_dim, module.num_heads
    w_in = module.in_proj_weight.to(work).chunk(3)
    b_in = module.in_proj_bias.to(work).chunk(3) if module.in_proj_bias is not None else (None,) * 3
    with torch.enable_grad():
        proj = [
            F.linear(x, w, b).detach().requires_grad_()
            for x, w, b in zip(xs, w_in, b_in, strict=True)
        ]
        q, k, v = (p.view(n, p.shape[1], h, e // h).transpose(1, 2) for p in proj)
        mask = _attention_mask(module, args, n, work)
        weights = None
        if grad_weights is None:
            heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(e // h)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            heads_out = weights @ v
            if args["average_attn_weights"]:
                weights = weights.mean(1)
        a = heads_out.transpose(1, 2).reshape(n, -1, e)
        grad_a = grad_out.to(work) @ module.out_proj.weight.to(work)
        outputs, grads = [a], [grad_a]
        if weights is not None and grad_weights is not None:
            outputs.append(weights)
            grads.append(grad_weights.to(work))
        g_proj = torch.autograd.grad(outputs, proj, grads)
    return xs, list(g_proj), a.detach(), grad_out.to(work)


def instrument(
    module: nn.MultiheadAttention,
    call: Call,
    tap: Callable[[torch.Tensor], torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None] | None:
    """MultiheadAttention's forward, decomposed with taps on q, k, v and the output.

    Returns None (use the module's own forward) when the attention weights are requested or the
    causal hint comes without a mask; ``call.saved`` keeps the batch-first inputs and ``a``.
    """
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    a_args = bound.arguments
    if a_args["need_weights"] or (a_args["is_causal"] and a_args["attn_mask"] is None):
        return None
    xs = [a_args["query"], a_args["key"], a_args["value"]]
    if not module.batch_first:
        xs = [x.transpose(0, 1) for x in xs]
    n, e, h = xs[0].shape[0], module.embed_dim, module.num_heads
    w_in = module.in_proj_weight.chunk(3)
    b_in = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    proj = [tap(F.linear(x, w, b)) for x, w, b in zip(xs, w_in, b_in, strict=True)]
    q, k, v = (p.view(n, p.shape[1], h, e // h).transpose(1, 2) for p in proj)
    dropout = module.dropout if module.training else 0.0
    mask = _attention_mask(module, a_args, n, q.dtype)
    heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    a = heads_out.transpose(1, 2).reshape(n, -1, e)
    out = tap(F.linear(a, module.out_proj.weight, module.out_proj.bias))
    call.saved = {"inputs": xs, "attention": a}
    return (out if module.batch_first else out.transpose(0, 1)), None


def _instrumented_grads(
    call: Call,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The same four results as :func:`_projection_grads`, read from an instrumented call, in
    the model's dtype: these are the tensors the model's own weight gradients multiply, so
    the rule hands them to the products through ``triton_products.operands``."""
    xs = list(call.saved["inputs"])
    g_proj = [call.grad(k) for k in range(3)]
    return xs, g_proj, call.saved["attention"].detach(), call.grad(3)


def accepts(module: nn.MultiheadAttention, layout: CallLayout) -> bool:
    """query, key, value and output with their samples on axis 0 (batch_first) or 1, one entry
    each; masks per sample on axis 0 (a 3-d attn_mask: one block of heads per sample) or shared."""
    seq = Sampled(0 if module.batch_first else 1, 1)
    allowed = {seq, Sampled(0, 1), Sampled(0, module.num_heads)}
    return (
        layout.primary == seq
        and bool(layout.outputs)
        and layout.outputs[0] == seq
        and all(v == Sampled(0, 1) for v in layout.outputs[1:])
        and all(v is None or isinstance(v, Broadcast) or v in allowed for v in layout.inputs)
    )


@register_rule(
    nn.MultiheadAttention,
    layout=accepts,
    supports=supports,
    extra_params=("out_proj.weight", "out_proj.bias"),
    instrument=instrument,
)
def attention_rule(module: nn.MultiheadAttention, calls: list[Call], ctx: RuleContext) -> None:
    work = ctx.work_dtype
    per_call = [
        _instrumented_grads(c) if c.saved else _projection_grads(module, c, work) for c in calls
    ]

    def squares(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(O, I) sum over samples of the squared g^T x, for g (N, T, O) and x (N, T, I)."""
        g_in, x_in = triton_products.operands(g, x, work, ctx.backend)
        return ctx.square_sum(g_in.unsqueeze(1), x_in.unsqueeze(1))[0]

    weight_rows, bias_rows = [], []
    for j in range(3):  # query, key, value blocks of the packed projection
        x = joined([pc[0][j] for pc in per_call], dim=1)
        g = joined([pc[1][j] for pc in per_call], dim=1)
        weight_rows.append(squares(g, x))
        bias_rows.append(g.to(work).sum(1))
    ctx.add("in_proj_weight", torch.cat(weight_rows))
    if module.in_proj_bias is not None:
        ctx.add_bias("in_proj_bias", torch.cat(bias_rows, dim=1))
    a = joined([pc[2] for pc in per_call], dim=1)
    g_out = joined([pc[3] for pc in per_call], dim=1)
    ctx.add("out_proj.weight", squares(g_out, a))
    if module.out_proj.bias is not None:
        ctx.add_bias("out_proj.bias", g_out.to(work).sum(1))
