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

The rule recomputes h and a one expert at a time, takes the gate's vector-Jacobian product by
autograd (any gate function), and squares the per-sample sums of all experts in one product:
each sample's pairs of one expert are padded to the largest such count (zero rows add nothing).
Without it, the whole MoE block was re-run per sample (one sample at a time where vmap cannot
run its data-dependent dispatch).

A module is recognised by its parameters and configuration flags and *verified*: its forward
runs once on random rows, experts and weights and must reproduce the formula above
(lookalike.py); a variant with biases, transposed weights, a norm after each expert or expert
parallelism is not matched and takes the generic path.
"""

from __future__ import annotations

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


def _arguments(call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = dict(zip(names, call.args, strict=False)) | call.kwargs
    return values["hidden_states"], values["top_k_index"], values["top_k_weights"]


class _Pairs:
    """The (token, chosen expert) pairs of one call, sorted by expert then sample: each pair's
    token and routing weight, and its row in the padded (sample, expert, place) layout, its
    place counted among its sample's pairs of that expert from ``offset`` on."""

    def __init__(self, index: torch.Tensor, weights: torch.Tensor, experts: int, n: int) -> None:
        rows, chosen = index.shape
        token = torch.arange(rows, device=index.device).repeat_interleave(chosen)
        expert = index.reshape(-1)
        key = expert * n + token // (rows // n)  # expert, then sample
        order = torch.argsort(key, stable=True)
        self.token, self.weight = token[order], weights.reshape(-1)[order]
        counts = torch.bincount(key, minlength=experts * n)
        self.longest = int(counts.max()) if counts.numel() else 0
        starts = torch.cumsum(counts, 0) - counts
        place = torch.arange(order.numel(), device=index.device) - starts[key[order]]
        sample, expert = key[order] % n, key[order] // n
        self._cell = sample * experts + expert  # the (sample, expert) cell of each pair
        self._place = place
        self.ends = torch.cumsum(counts.reshape(experts, n).sum(1), 0).tolist()

    def rows(self, longest: int, offset: int) -> torch.Tensor:
        """Each pair's row in a padded (n · experts · longest, ·) layout."""
        return self._cell * longest + self._place + offset


def _experts_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    gate_up: torch.Tensor = module.gate_up_proj  # type: ignore[assignment]
    down: torch.Tensor = module.down_proj  # type: ignore[assignment]
    experts, two_inner, hidden = gate_up.shape
    n, dtype = ctx.n_samples, gate_up.dtype
    pairs = [_Pairs(*_arguments(c)[1:], experts, n) for c in calls]
    longest = sum(p.longest for p in pairs)  # calls' pairs of one sample and expert, stacked
    shape = (n, experts, longest)
    x_pad, dout_pad = (gate_up.new_zeros(*shape, hidden) for _ in range(2))
    dh_pad, a_pad = gate_up.new_zeros(*shape, two_inner), gate_up.new_zeros(*shape, two_inner // 2)
    offset = 0
    for call, p in zip(calls, pairs, strict=True):
        x_rows = _arguments(call)[0][p.token].to(dtype)  # (pairs, D), sorted
        dout = call.grad().to(dtype)[p.token] * p.weight[:, None].to(dtype)
        dh = x_rows.new_empty(x_rows.shape[0], two_inner)
        a = x_rows.new_empty(x_rows.shape[0], two_inner // 2)
        start = 0
        for e, end in enumerate(p.ends):
            if end > start:
                span = slice(start, end)
                with torch.enable_grad():
                    h = (x_rows[span] @ gate_up[e].detach().t()).requires_grad_(True)
                    gated = module._apply_gate(h)  # type: ignore[operator]
                    dh[span] = torch.autograd.grad(gated, h, dout[span] @ down[e].detach())[0]
                a[span] = gated.detach()
            start = end
        rows = p.rows(longest, offset)
        for pad, values in ((x_pad, x_rows), (dout_pad, dout), (dh_pad, dh), (a_pad, a)):
            pad.view(-1, pad.shape[-1]).index_copy_(0, rows, values)
        offset += p.longest
    if gate_up.requires_grad:
        ctx.add("gate_up_proj", ctx.square_sum(dh_pad, x_pad))
    if down.requires_grad:
        ctx.add("down_proj", ctx.square_sum(dout_pad, a_pad))


register_matched_rule(_looks_like_experts, RuleSpec(_experts_rule, layout=rows_of_samples))
