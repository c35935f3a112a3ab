"""Mixture-of-experts routers: a weight used once, as ``F.linear(rows, weight)``, in a forward
of the router's own (softmax, top-k, renormalisation) that no other rule describes.

A router (``MixtralTopKRouter`` and the like) is called on the tokens flattened to rows,
(N·T, D), and returns logits, routing weights and expert indices. Its weight enters only through
the logits z = x W^T (+ b) (in the weight's dtype or after a cast to float32), so its per-sample
gradient is sum_(t in n) dz_t ⊗ x_t, whatever the forward does with z afterwards. The rule runs the router's forward again on the call's input,
with z replaced by a leaf of its own (a torch-function mode swaps it in at the F.linear call),
and takes dz by autograd from the gradients that arrived at the call's outputs.

A module is recognised by its class name (ending in "Router") and its parameters (a 2-D
``weight``, an optional ``bias``), in eval mode only (a router in training mode may add noise
to its logits, which the rule's re-run would draw anew), and *verified* once on a random input: its forward must make
exactly one F.linear call on the weight (with the bias or none, either possibly cast), on its
input's rows in their order, and use the weight nowhere else. A router that uses it twice, or
transforms it otherwise, is not matched and takes the generic path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from fisher_fast.fim.layout import Broadcast, CallLayout, Sampled
from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, joined, register_matched_rule
from fisher_fast.fim.rules.lookalike import checked_once, random_input

_T = torch.Tensor
# Casts of the weight to another dtype (``self.weight.float()``, ``.type(torch.float32)``,
# as routers that compute their logits in float32 do): the cast stands for the weight.
_CASTS = frozenset({_T.type, _T.to, _T.float, _T.double, _T.half, _T.bfloat16})


class _LogitsLeaf(TorchFunctionMode):
    """Replaces the result of ``F.linear(x, weight, bias)`` (``weight`` and ``bias``: the
    router's, or casts of them) by a leaf that requires grad; keeps the call's input and counts
    the calls, and any other use of the weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weights, self.biases = [weight], [bias]  # the parameters and their casts
        self.inputs: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None
        self.other_uses = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CASTS and args:
            for kept in (self.weights, self.biases):
                if any(args[0] is t for t in kept):
                    result = func(*args, **kwargs)
                    kept.append(result)
                    return result
        uses = any(any(t is w for w in self.weights) for t in tree_leaves((args, kwargs)))
        if func is F.linear and uses:
            named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
            weight, bias = named.get("weight"), named.get("bias")
            if any(weight is w for w in self.weights) and any(bias is b for b in self.biases):
                self.inputs.append(named["input"])
                self.logits = func(*args, **kwargs).detach().requires_grad_(True)
                return self.logits
        self.other_uses += uses
        return func(*args, **kwargs)


def _run(module: nn.Module, x: torch.Tensor) -> tuple[Any, _LogitsLeaf]:
    """The router's forward on ``x`` with its logits a leaf (no module hook sees the call)."""
    mode = _LogitsLeaf(module.get_parameter("weight"), getattr(module, "bias", None))
    with mode:
        out = type(module).forward(module, x)
    return out, mode


def _reads_rows(module: nn.Module, rows: int) -> bool:
    """Whether the forward makes one F.linear call on the weight, on its input's rows in order,
    and uses the weight nowhere else (checked once per module on a random input)."""

    def test() -> bool:
        x = random_input(module, (rows, module.get_parameter("weight").shape[1]))
        try:
            with torch.no_grad():  # no gradient: not a use of the weight (param_uses.py)
                _, mode = _run(module, x)
        except Exception:  # a module that does not take rows (N·T, D) is not such a router
            return False
        return (
            len(mode.inputs) == 1
            and mode.other_uses == 0
            and tuple(mode.inputs[0].shape) == tuple(x.shape)
            and bool(torch.equal(mode.inputs[0], x.to(mode.inputs[0].dtype)))
        )

    return checked_once(module, "router reads its input's rows", test)


def _looks_like_router(module: nn.Module) -> bool:
    """A class named like a router, in eval mode, holding a 2-D ``weight`` (and at most a
    ``bias``), whose forward reads the weight once, in F.linear on its input's rows."""
    if not type(module).__name__.endswith("Router") or module.training:
        return False  # in training mode a router may draw noise, which a re-run would redraw
    params = {name for name, p in module.named_parameters() if p.requires_grad}
    weight = getattr(module, "weight", None)
    if not params <= {"weight", "bias"} or not isinstance(weight, nn.Parameter):
        return False
    return weight.dim() == 2 and _reads_rows(module, 6)


def samples_on_axis_0(module: nn.Module, layout: CallLayout) -> bool:
    """The input and every output hold the samples along axis 0, k consecutive entries each
    (any k: tokens (N, T, D) or rows (N·T, D) in, rows out): the logits' input rows, the input
    flattened to (rows, D), are then sample after sample."""
    leaves = [layout.primary, *layout.outputs]
    return (
        bool(layout.outputs)
        and all(isinstance(v, Sampled) and v.axis == 0 for v in leaves)
        and all(v is None or isinstance(v, Broadcast) or v in leaves for v in layout.inputs)
    )


def _router_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    n = ctx.n_samples
    xs, dzs = [], []
    for call in calls:
        x = call.input
        with torch.enable_grad():
            out, mode = _run(module, x)
            floats = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            floats = [t for t in floats if t.is_floating_point()]
            pairs = [(t, call.grad(k)) for k, t in enumerate(floats) if t.requires_grad]
            assert mode.logits is not None and len(mode.inputs) == 1
            (dz,) = torch.autograd.grad(
                [t for t, _ in pairs], mode.logits, [g for _, g in pairs], allow_unused=True
            )
        if dz is None:
            dz = torch.zeros_like(mode.logits)
        rows = mode.inputs[0]
        xs.append(rows.reshape(n, -1, rows.shape[-1]))
        dzs.append(dz.reshape(n, -1, dz.shape[-1]).to(rows.dtype))
    x_all, dz_all = joined(xs, dim=1), joined(dzs, dim=1)
    if module.weight.requires_grad:
        ctx.add("weight", ctx.square_sum(dz_all.unsqueeze(1), x_all.unsqueeze(1))[0])
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        ctx.add_bias("bias", dz_all.sum(1))


register_matched_rule(_looks_like_router, RuleSpec(_router_rule, layout=samples_on_axis_0))
