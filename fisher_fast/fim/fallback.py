"""Generic per-sample rule for modules without a dedicated rule: torch.func over one module.

For each call of the module, the per-sample gradient of the chosen parameters is the
vector-Jacobian product of the module's own forward, run on that sample alone, with the
captured output gradient of that sample: ``vmap(vjp(functional_call(module, ...)))``. Children
called inside are recomputed, but only the named parameters are differentiated. Inputs whose
first axis has the batch size are treated as batched (batch-first layouts); everything else is
shared by all samples. Samples are processed in chunks to bound the per-sample gradient memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from fisher_fast.fim.rules import Call, RuleContext

CHUNK_BYTES = 64 * 2**20


def _batched_dims(tree: Any, n: int) -> Any:
    return tree_map(
        lambda v: 0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else None,
        tree,
    )


def _float_leaves(out: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [v for v in leaves if isinstance(v, torch.Tensor) and v.is_floating_point()]


def make_fallback_rule(
    param_names: list[str], paused: Callable[[], Any]
) -> Callable[[nn.Module, list[Call], RuleContext], None]:
    """A rule differentiating ``param_names`` (dotted, relative to the module) per sample.

    ``paused()`` is a context manager that silences the capture hooks while the module is re-run.
    """

    def rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
        params = {name: module.get_parameter(name).detach() for name in param_names}
        n = _batch_size(calls[0])
        size = sum(p.numel() for p in params.values())
        step = max(1, CHUNK_BYTES // max(1, size * 4 * (len(calls) + 1)))
        totals = {
            name: torch.zeros(p.shape, dtype=ctx.acc_dtype, device=p.device)
            for name, p in params.items()
        }
        with paused():
            for start in range(0, n, step):
                part = slice(start, start + step)
                summed: dict[str, torch.Tensor] | None = None
                for call in calls:
                    grads = _per_sample_grads(module, params, call, part, ctx.work_dtype)
                    summed = grads if summed is None else {k: summed[k] + grads[k] for k in grads}
                assert summed is not None
                for name, g in summed.items():
                    totals[name] += g.square().sum(0, dtype=ctx.acc_dtype)
        for name, total in totals.items():
            ctx.add(name, total)

    return rule


def _batch_size(call: Call) -> int:
    leaves, _ = tree_flatten((call.args, call.kwargs))
    for v in leaves:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("cannot find the batch size of a module call with no tensor inputs")


def _per_sample_grads(
    module: nn.Module, params: dict[str, torch.Tensor], call: Call, part: slice, work: torch.dtype
) -> dict[str, torch.Tensor]:
    """{name: (chunk, *shape)} per-sample gradients of one call, for samples in ``part``."""
    n = _batch_size(call)
    arg_dims, kwarg_dims = _batched_dims(call.args, n), _batched_dims(call.kwargs, n)
    args = tree_map(lambda v, d: v if d is None else v[part], call.args, arg_dims)
    kwargs = tree_map(lambda v, d: v if d is None else v[part], call.kwargs, kwarg_dims)
    grads = [call.grad(k)[part] for k in range(len(call.output_meta))]

    def one_sample(
        p: dict[str, torch.Tensor], a: tuple[Any, ...], kw: dict[str, Any], g: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        a1 = tree_map(lambda v, d: v if d is None else v.unsqueeze(0), a, arg_dims)
        kw1 = tree_map(lambda v, d: v if d is None else v.unsqueeze(0), kw, kwarg_dims)

        def forward(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return tuple(_float_leaves(functional_call(module, q, a1, kw1)))

        pullback = vjp(forward, p)[1]
        return pullback(tuple(gk.unsqueeze(0) for gk in g))[0]

    in_dims = (None, arg_dims, kwarg_dims, [0] * len(grads))
    out = vmap(one_sample, in_dims=in_dims)(params, args, kwargs, grads)
    return {k: v.to(work) for k, v in out.items()}
