"""nn.Embedding: per sample, gradients of repeated indices are summed before squaring.

For indices (N, *) and output gradient (N, *, D), the per-sample gradient of row v is the sum of
g over the positions of that sample holding index v. The positions are sorted by (v, sample), so
that each (v, sample) pair is a run of equal keys and the pairs of one row v are adjacent: one
run sum per pair gives the per-sample gradients, squared, and one run sum of those per row v
gives the row's sum over samples, added to the accumulator in place (rows.py: in a fixed order,
every tensor M × D for M = N·T positions, never N × vocabulary × D nor a vocabulary × D
temporary, and no host sync). padding_idx rows get no gradient (as in PyTorch: the positions
holding it contribute zero); with scale_grad_by_freq each sum is divided by the index's count
within its own sample (the per-sample loss's batch).
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.fim.rows import runs, scatter_runs, sum_runs
from fisher_fast.fim.rules import Call, RuleContext, joined, register_rule


def without_padding(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g (N, T, D) with the positions holding ``padding_idx`` zeroed (a fixed-size where, where
    dropping them would make the number of positions depend on the ids)."""
    if module.padding_idx is None:
        return g
    return g.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)


@register_rule(nn.Embedding, layout="positionwise")
def embedding_rule(module: nn.Embedding, calls: list[Call], ctx: RuleContext) -> None:
    add_row_squares(module, calls, ctx, 1.0)


def add_row_squares(
    module: nn.Embedding, calls: list[Call], ctx: RuleContext, output_scale: float
) -> None:
    """The rule for a lookup whose output is the rows times ``output_scale`` (see module doc):
    the output gradients are scaled by it before they are summed per (row, sample)."""
    target = ctx.target("weight") if module.weight.requires_grad else None
    dim = module.weight.shape[1]
    n = calls[0].input.shape[0]
    idx = joined([c.input.reshape(n, -1) for c in calls], dim=1)  # (N, T)
    if target is None or idx.numel() == 0:
        return
    g = joined([c.grad().reshape(n, -1, dim) for c in calls], dim=1).to(ctx.work_dtype)
    g = without_padding(module, idx, g if output_scale == 1.0 else g * output_scale)
    sample = torch.arange(n, device=idx.device).unsqueeze(1)
    keys = (idx * n + sample).reshape(-1)  # row-major over (v, sample)
    order = torch.argsort(keys, stable=True)
    pairs = runs(keys[order])
    per_sample = sum_runs(g.reshape(-1, dim)[order], pairs)  # (M, D), pair j's gradient
    if module.scale_grad_by_freq:
        per_sample /= pairs.lengths.clamp(min=1).unsqueeze(1).to(per_sample.dtype)
    rows = runs(pairs.keys // n)  # the pairs' rows v, sorted with them
    scatter_runs(target, rows, sum_runs(per_sample.square_(), rows).to(target.dtype))
