"""Mixture-of-experts layers: Hugging Face's experts held as 3-D parameters, indexed by expert.

Mixtral, Qwen-MoE, OLMoE, DeepSeek and most other MoE models in transformers keep their experts
in one module with ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I), called on the tokens
flattened to rows, (N·T, D), with each row's chosen experts ``top_k_index`` (N·T, k) and routing
weights ``top_k_weights`` (N·T, k):

    y_t = sum_j w_tj · down[e_tj] · gate(gate_up[e_tj] · x_t)

whatever loop or grouped product computes it (``gate``: the module's own ``_apply_gate``,
``act(gate) * up`` by default). Each token's row belongs to one sample, so expert e's
per-sample gradients are sums over that sample's rows routed to e:

    d down[e]_n    = sum_(t,j in n, e_tj = e) (w_tj g_t) ⊗ a_tj,     a = gate(h), h = gate_up[e] x_t
    d gate_up[e]_n = sum_(t,j in n, e_tj = e) dh_tj ⊗ x_t,           dh = gate's VJP of (w_tj g_t down[e])

While diag_fim runs the model, the module's forward is replaced by the same formula computed
here (``_instrument``: one product per expert on its pairs, sorted by expert, any gate function),
with taps on h and on each pair's expert output, so the model's own backward pass delivers dh
and w_tj g_t; the rule squares the per-sample sums of all experts in one product, each sample's
pairs of one expert padded to the largest such count (zero rows add nothing).
Without it, the whole MoE block was re-run per sample (one sample at a time where vmap cannot
run its data-dependent dispatch).

A module is recognised by its parameters and configuration flags and *verified*: its forward
runs once on random rows, experts and weights and must reproduce the formula above
(lookalike.py); a variant with biases, transposed weights, a norm after each expert or expert
parallelism is not matched and takes the generic path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fisher_fast.fim.layout import Broadcast, CallLayout
from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, register_matched_rule
from fisher_fast.fim.rules.lookalike import reproduces

_EXAMPLE_ROWS = 6


def _flags_match(module: nn.Module) -> bool:
    """The configuration the formula describes: gated, no biases, weights stored (E, out, in),
    no norm after the experts, every expert local."""
    return (
        getattr(module, "has_gate", None) is True
        and getattr(module, "has_bias", None) is False
        and getattr(module, "is_transposed", None) is False
        and not getattr(module, "has_post_expert_norm", False)
        and not getattr(module, "_is_expert_parallel", False)
        and callable(getattr(module, "_apply_gate", None))
    )


def _looks_like_experts(module: nn.Module) -> bool:
    """Hugging Face experts (``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I), no other
    parameter) whose forward reproduces the formula on random routing."""
    params = dict(module.named_parameters())
    if set(params) != {"gate_up_proj", "down_proj"} or not _flags_match(module):
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    experts, two_inner, hidden = gate_up.shape
    if tuple(down.shape) != (experts, hidden, two_inner // 2) or two_inner % 2:
        return False
    chosen = min(2, experts)
    generator = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(experts, generator=generator)[:chosen] for _ in range(6)])
    weights = torch.rand(_EXAMPLE_ROWS, chosen, generator=generator).to(gate_up)
    index = index.to(gate_up.device)

    def reference(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float64)
        for j in range(chosen):
            e = index[:, j]
            h = torch.einsum("rd,rod->ro", x.double(), gate_up[e].double())
            a = module._apply_gate(h)  # type: ignore[operator]
            out += weights[:, j, None].double() * torch.einsum("ri,roi->ro", a, down[e].double())
        return out

    def forward(x: torch.Tensor) -> torch.Tensor:
        return type(module).forward(module, x, index, weights)

    return reproduces(module, "experts", reference, (_EXAMPLE_ROWS, hidden), forward, sums=True)


def rows_of_samples(module: nn.Module, layout: CallLayout) -> bool:
    """Every input and output holds k consecutive rows per sample along axis 0 (the tokens
    flattened with the samples), or no sample at all: each row is one sample's."""
    common = layout.uniform()
    return (
        common is not None
        and common.axis == 0
        and all(v is None or isinstance(v, Broadcast) or v == common for v in layout.inputs)
    )


def _arguments(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of a call of the experts."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = dict(zip(names, args, strict=False)) | kwargs
    return values["hidden_states"], values["top_k_index"], values["top_k_weights"]


class _Pairs:
    """The (token, chosen expert) pairs of one call, sorted by expert, then token (the tokens
    are sample after sample): each pair's token, expert and routing weight."""

    def __init__(self, index: torch.Tensor, weights: torch.Tensor, experts: int) -> None:
        tokens, chosen = index.shape
        token = torch.arange(tokens, device=index.device).repeat_interleave(chosen)
        expert = index.reshape(-1)
        order = torch.argsort(expert, stable=True)
        self.tokens, self.experts = tokens, experts
        self.token, self.expert = token[order], expert[order]
        self.weight = weights.reshape(-1)[order]
        ends = torch.cumsum(torch.bincount(expert, minlength=experts), 0).tolist()
        starts = [0, *ends[:-1]]
        self.spans = [
            (e, slice(a, b)) for e, (a, b) in enumerate(zip(starts, ends, strict=True)) if b > a
        ]

    def cells(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For n samples: each pair's (sample, expert) cell, numbered sample · experts + expert,
        its place among the cell's pairs, and the most pairs in one cell."""
        sample = self.token // (self.tokens // n)
        key = self.expert * n + sample  # ascending: the pairs are sorted so
        counts = torch.bincount(key, minlength=self.experts * n)
        starts = torch.cumsum(counts, 0) - counts
        place = torch.arange(key.numel(), device=key.device) - starts[key]
        return sample * self.experts + self.expert, place, int(counts.max())


def _instrument(
    module: nn.Module, call: Call, tap: Callable[[torch.Tensor], torch.Tensor], *args: Any,
    **kwargs: Any,
) -> torch.Tensor:  # fmt: skip
    """The experts' forward, one product per expert on its sorted pairs, with taps on the
    up-projections h and the experts' outputs (before the routing weights), whose gradients
    the rule reads; ``call.saved`` keeps the pairs, their inputs and the gated activations.
    The formula is the module's own, verified when it was matched (``_looks_like_experts``)."""
    x, index, weights = _arguments(*args, **kwargs)
    gate_up, down = module.get_parameter("gate_up_proj"), module.get_parameter("down_proj")
    pairs = _Pairs(index, weights, gate_up.shape[0])
    rows = x[pairs.token]
    h = tap(torch.cat([rows[span] @ gate_up[e].t() for e, span in pairs.spans]))
    a = module._apply_gate(h)  # type: ignore[operator]
    out = tap(torch.cat([a[span] @ down[e].t() for e, span in pairs.spans]))
    weighted = (out * pairs.weight[:, None]).to(x.dtype)
    call.saved = {"pairs": pairs, "rows": rows, "gated": a}
    return torch.zeros_like(x).index_add(0, pairs.token, weighted)


def _experts_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    gate_up = module.get_parameter("gate_up_proj")
    down = module.get_parameter("down_proj")
    experts, two_inner, hidden = gate_up.shape
    n, dtype = ctx.n_samples, gate_up.dtype
    parts = [
        (c.saved["pairs"], c.saved["rows"], c.saved["gated"], c.grad(0), c.grad(1)) for c in calls
    ]
    cells = [p[0].cells(n) for p in parts]
    longest = sum(most for _, _, most in cells)  # the calls' pairs of one cell, one after another
    shape = (n, experts, longest)
    x_pad, dout_pad = (gate_up.new_zeros(*shape, hidden) for _ in range(2))
    dh_pad, a_pad = gate_up.new_zeros(*shape, two_inner), gate_up.new_zeros(*shape, two_inner // 2)
    offset = 0
    for (_, rows, a, dh, dout), (cell, place, most) in zip(parts, cells, strict=True):
        at = cell * longest + place + offset
        for pad, values in ((x_pad, rows), (dout_pad, dout), (dh_pad, dh), (a_pad, a)):
            pad.view(-1, pad.shape[-1]).index_copy_(0, at, values.to(dtype))
        offset += most
    if gate_up.requires_grad:
        ctx.add("gate_up_proj", ctx.square_sum(dh_pad, x_pad))
    if down.requires_grad:
        ctx.add("down_proj", ctx.square_sum(dout_pad, a_pad))


register_matched_rule(
    _looks_like_experts,
    RuleSpec(_experts_rule, layout=rows_of_samples, instrument=_instrument),
)
