"""Generic per-sample path: torch.func over one module call, along that call's sample axes.

For each call of the module, the per-sample gradient of the chosen parameters is the
vector-Jacobian product of the module's own forward, run on that sample alone, with the
captured output gradient of that sample: ``vmap(vjp(functional_call(module, ...)))``. Where the
samples are in each input and output comes from the call's layout (layout.py): a tensor with a
sample axis is split along it (axis 0 or not), a tensor without one is shared by all samples.
Children called inside are recomputed, but only the named parameters are differentiated.
Samples go in chunks to bound the per-sample gradient memory. nn.LSTM and nn.GRU run as their
recurrence written out in elementary ops (rnn_replica.py), which vmap batches; their fused op it
cannot. A module that ``vmap`` cannot run
(data-dependent control flow, ``.item()``, an op without a batching rule) is re-run one sample
at a time instead: slower, and as exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from fisher_fast.fim.layout import CallLayout, Sampled
from fisher_fast.fim.one_sample_norms import contiguous_norm_gradients
from fisher_fast.fim.rnn_replica import replica
from fisher_fast.fim.rules import Call, RuleContext

CHUNK_BYTES = 64 * 2**20


class PerSampleLoopWarning(UserWarning):
    """A module's per-sample gradients are computed one sample at a time (vmap failed)."""


def make_fallback_rule(
    name: str,
    param_names: list[str],
    layouts: list[CallLayout],
    paused: Callable[[], Any],
) -> Callable[[nn.Module, list[Call], RuleContext], None]:
    """A rule differentiating ``param_names`` (dotted, relative to the module) per sample.

    ``layouts[i]`` is call i's layout; ``paused()`` silences the capture hooks while the module
    is re-run.
    """
    state = {"loop": False}

    def rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
        params = {p: module.get_parameter(p).detach() for p in param_names}
        # Every other parameter enters as a constant: no graph is built for it, and ops that
        # refuse inputs requiring grad (sdpa's attn_mask on CPU) accept a bias made from it.
        constants = {k: v.detach() for k, v in module.named_parameters() if k not in params}
        n = ctx.n_samples
        size = sum(p.numel() for p in params.values())
        step = max(1, CHUNK_BYTES // max(1, size * 4 * (len(calls) + 1)))
        totals = {
            p: torch.zeros(t.shape, dtype=ctx.acc_dtype, device=t.device) for p, t in params.items()
        }
        # Grad mode on: under no_grad some kernels (oneDNN's LSTM) skip what their backward needs.
        with paused(), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop because")
            for start in range(0, n, step):
                part = range(start, min(n, start + step))
                summed: dict[str, torch.Tensor] | None = None
                for call, layout in zip(calls, layouts, strict=True):
                    grads = _grads(
                        module, params, constants, call, layout, part, ctx.work_dtype, state, name
                    )
                    summed = grads if summed is None else {k: summed[k] + grads[k] for k in grads}
                assert summed is not None
                for p, g in summed.items():
                    totals[p] += g.square().sum(0, dtype=ctx.acc_dtype)
        for p, total in totals.items():
            ctx.add(p, total)

    return rule


def _grads(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
    call: Call,
    layout: CallLayout,
    part: range,
    work: torch.dtype,
    state: dict[str, bool],
    name: str,
) -> dict[str, torch.Tensor]:
    """{name: (chunk, *shape)} per-sample gradients of one call, for samples in ``part``:
    vmapped, or one sample at a time once vmap has failed on this module."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    grads = [call.grad(k) for k in range(len(call.output_meta))]
    one = _one_sample(module, spec, layout, constants)
    if not state["loop"]:
        in_dims = [lay.axis if isinstance(lay, Sampled) else None for lay in layout.inputs]
        out_dims = [lay.axis if isinstance(lay, Sampled) else None for lay in layout.outputs]
        chunk = [
            [v.narrow(lay.axis, part.start, len(part)) if isinstance(lay, Sampled) else v
             for v, lay in zip(values, lays, strict=True)]
            for values, lays in ((leaves, layout.inputs), (grads, layout.outputs))
        ]  # fmt: skip
        try:
            out = vmap(one, in_dims=(None, in_dims, out_dims))(params, *chunk)
            return {k: v.to(work) for k, v in out.items()}
        except Exception as error:  # any failure of vmap: re-run per sample
            state["loop"] = True
            warnings.warn(
                f"{name or 'the model'} ({type(module).__name__}): torch.func.vmap cannot run it "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}), so its per-sample "
                "gradients are computed one sample at a time (exact, slower)",
                PerSampleLoopWarning,
                stacklevel=2,
            )

    def sample(values: list[Any], lays: list[Any], i: int) -> list[Any]:
        return [
            v.select(lay.axis, i) if isinstance(lay, Sampled) else v
            for v, lay in zip(values, lays, strict=True)
        ]

    by_autograd = _one_sample(module, spec, layout, constants, autograd=True)
    per_sample = [
        by_autograd(params, sample(leaves, layout.inputs, i), sample(grads, layout.outputs, i))
        for i in part
    ]
    return {k: torch.stack([g[k] for g in per_sample]).to(work) for k in params}


def _one_sample(
    module: nn.Module,
    spec: Any,
    layout: CallLayout,
    constants: dict[str, torch.Tensor],
    autograd: bool = False,
) -> Callable[[dict[str, torch.Tensor], list[Any], list[torch.Tensor]], dict[str, torch.Tensor]]:
    """The vector-Jacobian product of one sample: inputs and output gradients come without
    their sample axis. By ``torch.func.vjp`` (which vmap batches), or with ``autograd`` by a
    plain backward pass, for the one-sample-at-a-time path: it also runs what torch.func
    refuses (an autograd.Function without ``setup_context``, a module that changes a
    parameter's ``.data`` while it runs)."""

    def restore(values: list[Any], leaf_layouts: list[Any]) -> list[Any]:
        return [
            v.unsqueeze(lay.axis) if isinstance(lay, Sampled) else v
            for v, lay in zip(values, leaf_layouts, strict=True)
        ]

    def one(
        p: dict[str, torch.Tensor], leaves: list[Any], grads: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        args, kwargs = tree_unflatten(restore(leaves, layout.inputs), spec)

        unrolled = replica(module, tuple(args), kwargs)

        def forward(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            values = {**constants, **q}
            result = (
                unrolled(values, tuple(args), kwargs)
                if unrolled is not None
                else functional_call(module, values, tuple(args), kwargs)
            )
            out, _ = tree_flatten(result)
            return tuple(v for v in out if isinstance(v, torch.Tensor) and v.is_floating_point())

        cotangents = tuple(restore(grads, layout.outputs))
        if not autograd:
            pullback = vjp(forward, p)[1]
            return pullback(cotangents)[0]
        inputs = {k: v.detach().requires_grad_() for k, v in p.items()}
        with contiguous_norm_gradients(module):  # a batch of one (one_sample_norms.py)
            outputs = forward(inputs)
        pairs = [(o, g) for o, g in zip(outputs, cotangents, strict=True) if o.requires_grad]
        if not pairs:  # no output depends on the parameters
            return {k: torch.zeros_like(v) for k, v in inputs.items()}
        found = torch.autograd.grad(
            [o for o, _ in pairs], list(inputs.values()), [g for _, g in pairs], allow_unused=True
        )
        return {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(inputs.items(), found, strict=True)
        }

    return one
