"""Mixture-of-experts layers: Hugging Face's experts held as 3-D parameters, indexed by expert.

Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS and most other MoE models in transformers keep
their experts in one module with ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I) (or
stored transposed, (E, D, 2I) and (E, I, D), as GPT-OSS does; with biases (E, 2I) and (E, D)
or none), called on the tokens flattened to rows, (N·T, D), with each row's chosen experts
``top_k_index`` (N·T, k) and routing weights ``top_k_weights`` (N·T, k):

    y_t = sum_j w_tj · (down[e_tj] · gate(gate_up[e_tj] · x_t + b_up[e_tj]) + b_down[e_tj])

whatever loop or grouped product computes it (``gate``: the module's own ``_apply_gate``,
``act(gate) * up`` by default). Each token's row belongs to one sample, so expert e's
per-sample gradients are sums over that sample's rows routed to e:

    d down[e]_n    = sum_(t,j in n, e_tj = e) (w_tj g_t) ⊗ a_tj,     a = gate(h), h = gate_up[e] x_t + b
    d gate_up[e]_n = sum_(t,j in n, e_tj = e) dh_tj ⊗ x_t,           dh = gate's VJP of (w_tj g_t down[e])

and the biases' the same sums of w_tj g_t and dh_tj.

While diag_fim runs the model, the module's forward is replaced by the same formula computed
here (``_instrument``: one grouped product of the pairs, sorted by expert, or one product per
expert where torch has no grouped product for the dtype; any gate function),
with taps on h and on each pair's expert output, so the model's own backward pass delivers dh
and w_tj g_t; the rule squares the per-sample sums of a group of experts in one product, each
sample's pairs of one expert padded to the largest such count (zero rows add nothing), as many
experts at a time as the work budget allows (work_memory.py).
Without it, the whole MoE block was re-run per sample (one sample at a time where vmap cannot
run its data-dependent dispatch).

A module is recognised by its parameters and configuration flags and *verified*: its forward
runs once on random rows, experts and weights and must reproduce the formula above
(lookalike.py); a variant without a gate, with a norm after each expert or with expert
parallelism is not matched and takes the generic path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.fim.layout import Broadcast, CallLayout
from fisher_fast.fim.products import DEFAULT_CHUNK_BYTES
from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, register_matched_rule
from fisher_fast.fim.rules.lookalike import reproduces
from fisher_fast.fim.work_memory import work_bytes

_EXAMPLE_ROWS = 6


def _flags_match(module: nn.Module) -> bool:
    """The configurations the formula describes: gated, weights stored (E, out, in) or
    transposed, with biases or without, no norm after the experts, every expert local."""
    return (
        getattr(module, "has_gate", None) is True
        and isinstance(getattr(module, "has_bias", None), bool)
        and isinstance(getattr(module, "is_transposed", None), bool)
        and not getattr(module, "has_post_expert_norm", False)
        and not getattr(module, "_is_expert_parallel", False)
        and callable(getattr(module, "_apply_gate", None))
    )


_BIASES = ("gate_up_proj_bias", "down_proj_bias")


class _Weights:
    """The experts' parameters, the weights seen as (E, out, in) whichever way they are stored
    (views of the parameters, or of the accumulator's entries for them: ``of``)."""

    def __init__(self, module: nn.Module, of: Callable[[str], Any] | None = None) -> None:
        get = of if of is not None else module.get_parameter
        self.transposed = bool(module.is_transposed)
        self.up: Any = self._out_in(get("gate_up_proj"))
        self.down: Any = self._out_in(get("down_proj"))
        self.up_bias: Any = get(_BIASES[0]) if module.has_bias else None
        self.down_bias: Any = get(_BIASES[1]) if module.has_bias else None

    def _out_in(self, w: torch.Tensor | None) -> torch.Tensor | None:
        return None if w is None else (w.transpose(1, 2) if self.transposed else w)

    def project_up(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        h = rows @ self.up[e].t()
        return h if self.up_bias is None else h + self.up_bias[e]

    def project_down(self, a: torch.Tensor, e: int) -> torch.Tensor:
        out = a @ self.down[e].t()
        return out if self.down_bias is None else out + self.down_bias[e]


def _looks_like_experts(module: nn.Module) -> bool:
    """Hugging Face experts (``gate_up_proj`` and ``down_proj``, with their biases or none, no
    other parameter) whose forward reproduces the formula on random routing."""
    params = dict(module.named_parameters())
    if not _flags_match(module):
        return False
    names = {"gate_up_proj", "down_proj"} | (set(_BIASES) if module.has_bias else set())
    if set(params) != names or any(params[n].dim() != 3 for n in ("gate_up_proj", "down_proj")):
        return False
    w, w64 = _Weights(module), _Weights(module, lambda name: module.get_parameter(name).double())
    experts, two_inner, hidden = w.up.shape
    if tuple(w.down.shape) != (experts, hidden, two_inner // 2) or two_inner % 2:
        return False
    for bias, size in ((w.up_bias, two_inner), (w.down_bias, hidden)):
        if bias is not None and tuple(bias.shape) != (experts, size):
            return False
    chosen = min(2, experts)
    generator = torch.Generator().manual_seed(0)
    index = torch.stack(
        [torch.randperm(experts, generator=generator)[:chosen] for _ in range(_EXAMPLE_ROWS)]
    )
    weights = torch.rand(_EXAMPLE_ROWS, chosen, generator=generator).to(w.up)
    index = index.to(w.up.device)

    def reference(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float64)
        for r in range(_EXAMPLE_ROWS):
            for j in range(chosen):
                e = int(index[r, j])
                a = module._apply_gate(w64.project_up(x[r : r + 1].double(), e))  # type: ignore[operator]
                out[r] += weights[r, j].double() * w64.project_down(a, e)[0]
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
    are sample after sample): each pair's token, expert and routing weight, and where each
    expert's pairs start and end."""

    def __init__(self, index: torch.Tensor, weights: torch.Tensor, experts: int) -> None:
        tokens, chosen = index.shape
        token = torch.arange(tokens, device=index.device).repeat_interleave(chosen)
        expert = index.reshape(-1)
        order = torch.argsort(expert, stable=True)
        self.tokens = tokens
        self.token, self.expert = token[order], expert[order]
        self.weight = weights.reshape(-1)[order]
        self.offsets = torch.cumsum(torch.bincount(expert, minlength=experts), 0)
        self.ends = self.offsets.tolist()
        self.starts = [0, *self.ends[:-1]]
        self.spans = [
            (e, slice(a, b))
            for e, (a, b) in enumerate(zip(self.starts, self.ends, strict=True))
            if b > a
        ]


class _Cells:
    """The pairs of one call, by (sample, expert) cell for n samples: each pair's sample and
    place in its cell, and the most pairs of one cell, per expert."""

    def __init__(self, pairs: _Pairs, experts: int, n: int) -> None:
        self.pairs = pairs
        self.sample = pairs.token // (pairs.tokens // n)
        key = pairs.expert * n + self.sample  # ascending: the pairs are sorted so
        counts = torch.bincount(key, minlength=experts * n)
        self.place = torch.arange(key.numel(), device=key.device) - (counts.cumsum(0) - counts)[key]
        self.most = counts.reshape(experts, n).max(1).values.tolist()


def _grouped_mm_runs(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these rows and weights: torch 2.10 or later, one dtype of
    float32 or lower (under autocast they may differ, and only the per-expert products cast),
    on the CPU or a CUDA device of compute capability 8.0 or more."""
    if not hasattr(F, "grouped_mm") or rows.dtype not in _GROUPED_DTYPES:
        return False
    if weight.dtype != rows.dtype or torch.is_autocast_enabled(rows.device.type):
        return False
    if rows.device.type == "cuda":
        return torch.cuda.get_device_capability(rows.device) >= (8, 0)
    return rows.device.type == "cpu"


_GROUPED_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _by_expert(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pairs: _Pairs
) -> torch.Tensor:
    """Each pair's row times its expert's weight (E, out, in) (plus its bias): one grouped
    product where torch has one for the dtype, else one product per expert."""
    if _grouped_mm_runs(rows, weight):
        out = F.grouped_mm(rows, weight.transpose(1, 2), offs=pairs.offsets.to(torch.int32))
    else:
        out = torch.cat([rows[span] @ weight[e].t() for e, span in pairs.spans])
    return out if bias is None else out + bias[pairs.expert]


def _instrument(
    module: nn.Module, call: Call, tap: Callable[[torch.Tensor], torch.Tensor], *args: Any,
    **kwargs: Any,
) -> torch.Tensor:  # fmt: skip
    """The experts' forward on the pairs sorted by expert (``_by_expert``: one grouped product,
    or one product per expert), with taps on the up-projections h and the experts' outputs
    (before the routing weights), whose gradients the rule reads; ``call.saved`` keeps the pairs, their inputs and the gated activations.
    The formula is the module's own, verified when it was matched (``_looks_like_experts``)."""
    x, index, weights = _arguments(*args, **kwargs)
    w = _Weights(module)
    pairs = _Pairs(index, weights, w.up.shape[0])
    rows = x[pairs.token]
    h = tap(_by_expert(rows, w.up, w.up_bias, pairs))
    a = module._apply_gate(h)  # type: ignore[operator]
    out = tap(_by_expert(a, w.down, w.down_bias, pairs))
    weighted = (out * pairs.weight[:, None]).to(x.dtype)
    call.saved = {"pairs": pairs, "rows": rows, "gated": a}
    return torch.zeros_like(x).index_add(0, pairs.token, weighted)


def _groups(cells: list[_Cells], n: int, row_bytes: int, budget: int) -> list[range]:
    """Consecutive experts whose padded rows (n · experts · the calls' most pairs in one cell,
    ``row_bytes`` each) fit ``budget`` together (one expert at least)."""
    groups, first = [], 0
    experts = len(cells[0].most)
    for last in range(1, experts + 1):
        longest = sum(max(c.most[first:last]) for c in cells)
        if last - first > 1 and n * (last - first) * longest * row_bytes > budget:
            groups.append(range(first, last - 1))
            first = last - 1
    groups.append(range(first, experts))
    return groups


def _experts_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    weights = _Weights(module)
    experts, two_inner, hidden = weights.up.shape
    gate_up = module.get_parameter("gate_up_proj")
    n, dtype = ctx.n_samples, gate_up.dtype
    cells = [_Cells(c.saved["pairs"], experts, n) for c in calls]
    grads = [(c.saved["rows"], c.grad(1), c.grad(0), c.saved["gated"]) for c in calls]
    widths = (hidden, hidden, two_inner, two_inner // 2)  # x, dout, dh, a
    row_bytes = sum(widths) * gate_up.element_size()
    budget = work_bytes(gate_up.device, DEFAULT_CHUNK_BYTES)
    targets = _Weights(module, ctx.target)  # the accumulator's entries (None: not filled here)
    for group in _groups(cells, n, row_bytes, budget):
        first, size = group.start, len(group)
        most = [max(c.most[first : group.stop]) for c in cells]
        longest = sum(most)  # the calls' pairs of one cell, one after another
        x_pad, dout_pad, dh_pad, a_pad = (
            gate_up.new_zeros(n, size, longest, width) for width in widths
        )
        offset = 0
        for c, values, count in zip(cells, grads, most, strict=True):
            span = slice(c.pairs.starts[first], c.pairs.ends[group.stop - 1])
            cell = c.sample[span] * size + c.pairs.expert[span] - first
            at = cell * longest + c.place[span] + offset
            for pad, value in zip((x_pad, dout_pad, dh_pad, a_pad), values, strict=True):
                pad.view(-1, pad.shape[-1]).index_copy_(0, at, value[span].to(dtype))
            offset += count
        at_group = slice(first, group.stop)
        if targets.up is not None:
            targets.up[at_group] += ctx.square_sum(dh_pad, x_pad)
        if targets.down is not None:
            targets.down[at_group] += ctx.square_sum(dout_pad, a_pad)
        for bias, pad in ((targets.up_bias, dh_pad), (targets.down_bias, dout_pad)):
            if bias is not None:  # per sample: the sum over the cell's pairs
                bias[at_group] += pad.to(ctx.work_dtype).sum(2).square().sum(0)


register_matched_rule(
    _looks_like_experts,
    RuleSpec(_experts_rule, layout=rows_of_samples, instrument=_instrument),
)
