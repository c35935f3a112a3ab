"""Module calls held to their planned layouts: checked in every batch, shown to rules sample-first.

The plan (plan.py) is made from the first batch's layouts (layout.py). A later batch is only
computed with it while every call keeps those layouts (same number of calls, each sample axis
k times the batch's samples, each shared tensor the same shape); a batch that does not (another
sequence length, another branch taken) is planned anew, never computed along the wrong axis. Rules registered as "positionwise" may get
calls whose samples sit on another axis or in blocks of k; ``rule_calls`` moves them to axis 0
as (N, k, ...), so the rule's own code only ever sees samples first.
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.fim.layout import CallLayout, Sampled, flat_leaves, shape_matches, to_sample_first
from fisher_fast.fim.rules import Call, RuleSpec

_SAMPLE_FIRST = Sampled(0, 1)


def conforms(module: nn.Module, calls: list[Call], planned: list[CallLayout], n: int) -> bool:
    """Whether this batch's calls of ``module`` have the layouts the plan was made for."""
    if len(calls) != len(planned):
        return False
    for call, layout in zip(calls, planned, strict=True):
        leaves = flat_leaves((call.args, call.kwargs))
        if len(leaves) != len(layout.inputs):
            return False
        pairs = [(lay, _shape(v)) for lay, v in zip(layout.inputs, leaves, strict=True)]
        if not call.saved:  # an instrumented call's taps are not its outputs
            pairs += [(lay, m[0]) for lay, m in zip(layout.outputs, call.output_meta, strict=False)]
        if not all(shape_matches(lay, s, n) for lay, s in pairs):
            return False
    return True


def _shape(value: object) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def rule_calls(rule: RuleSpec, calls: list[Call], planned: list[CallLayout], n: int) -> list[Call]:
    """The calls as the rule computes them: positionwise rules get samples first (N, k, ...)."""
    if rule.layout != "positionwise":
        return calls
    moved = []
    for call, layout in zip(calls, planned, strict=True):
        common = layout.uniform()
        if common is None or common == _SAMPLE_FIRST:
            moved.append(call)
            continue
        grads = [to_sample_first(call.grad(k), common, n) for k in range(len(call.output_meta))]
        args = (to_sample_first(call.args[0], common, n), *call.args[1:])
        metas = [(g.shape, g.dtype, g.device) for g in grads]
        moved.append(Call(args, call.kwargs, metas, list(grads), call.saved))
    return moved
