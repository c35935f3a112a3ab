"""nn.Embedding: per sample, gradients of repeated indices are summed before squaring.

For indices (N, *) and output gradient (N, *, D), the per-sample gradient of row v is the sum of
g over the positions of that sample holding index v. Pairs (sample, index) are made unique, their
gradients summed (rows.add_rows: in a fixed order on every device), squared and added to their
rows: memory O(N·T·D), never N × vocabulary × D. padding_idx rows get no gradient (as in PyTorch); with scale_grad_by_freq
each sum is divided by the index's count within its own sample (the per-sample loss's batch).
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.fim.rows import add_rows
from fisher_fast.fim.rules import Call, RuleContext, joined, register_rule


@register_rule(nn.Embedding, layout="positionwise")
def embedding_rule(module: nn.Embedding, calls: list[Call], ctx: RuleContext) -> None:
    if not module.weight.requires_grad:
        return
    vocab, dim = module.weight.shape
    n = calls[0].input.shape[0]
    idx = joined([c.input.reshape(n, -1) for c in calls], dim=1)  # (N, T)
    g = joined([c.grad().reshape(n, -1, dim) for c in calls], dim=1).to(ctx.work_dtype)
    sample = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
    keys = (sample * vocab + idx).reshape(-1)
    grads = g.reshape(-1, dim)
    if module.padding_idx is not None:
        keep = idx.reshape(-1) != module.padding_idx
        keys, grads = keys[keep], grads[keep]
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    summed = torch.zeros(unique.numel(), dim, dtype=grads.dtype, device=grads.device)
    add_rows(summed, inverse, grads)
    if module.scale_grad_by_freq:
        summed /= counts.unsqueeze(1).to(summed.dtype)
    out = torch.zeros(vocab, dim, dtype=ctx.acc_dtype, device=grads.device)
    add_rows(out, unique % vocab, summed.square().to(ctx.acc_dtype))
    ctx.add("weight", out)
