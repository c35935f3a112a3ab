"""A parameter's uses in its module's own forward, given the sample axis where they meet samples.

Layer-scale gains (ConvNeXt's and BEiT's ``gamma``, shape (C,)) are used in their block's own
forward, as ``x.mul(gamma.reshape(1, -1, 1, 1))`` or ``gamma * attn(x)``, not through a
submodule, so no rule sees them, and their per-sample gradients used to need the whole block
re-run per sample. They lack the leading axis of 1 that broadcast_params.py expands, and an
expanded parameter would break the reshape. Instead the parameter is replaced, while its module
runs, by a traced alias (a tensor subclass that sees every op applied to it):

* an op on traced values and constants only (a reshape, a permute, a lookup in a constant index
  table, a cast) runs as usual and its result stays traced, remembering how it is computed from
  the parameter (a function f of it);
* an elementwise op (mul, add, sub, div) between a traced value d = f(p) and a tensor that
  may carry the samples (it requires grad, or has n entries along axis 0), whose result has the batch's n samples along axis 0 while d is broadcast along
  it, runs on a tapped view of d given the sample axis (``d.expand(n, ...)``, no copy): the
  gradient at that view is one slice per sample, and the parameter's per-sample gradients are
  f's vector-Jacobian products of the slices (vmapped);
* any other op mixing a traced value with such a tensor (a matrix product, an attention mask),
  or any op after the module returned, runs on the real values and marks the use as failed: the
  parameter then takes another path.

None of this is assumed exact: the engine keeps a traced parameter only when the planning batch
verifies it (expansion.verify), as for broadcast_params.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

# (tensor given the sample axis, its gradient -> the parameter's per-sample gradients) ->
# the tapped alias the op uses instead
Tap = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]

_T = torch.Tensor
ELEMENTWISE = frozenset(
    {torch.mul, torch.add, torch.sub, torch.div, torch.true_divide}
    | {_T.mul, _T.add, _T.sub, _T.div, _T.mul_, _T.add_, _T.sub_, _T.div_}
    | {_T.__mul__, _T.__rmul__, _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__}
    | {_T.__truediv__, _T.__rtruediv__, _T.__imul__, _T.__iadd__, _T.__isub__, _T.__itruediv__}
)


class Trace:
    """One call of a parameter's module: the batch's n samples, the parameter, where its
    expanded uses go (``tap``), and why tracing failed (None while it has not)."""

    def __init__(self, n: int, param: torch.Tensor, tap: Tap) -> None:
        self.n, self.param, self.tap = n, param, tap
        self.failed: str | None = None
        self.closed = False

    def alias(self) -> torch.Tensor:
        """The traced alias of the parameter (same values, its gradient reaches it)."""
        with torch._C.DisableTorchFunctionSubclass():
            return _traced(self.param.as_subclass(torch.Tensor), self, lambda q: q)

    def close(self, output: Any) -> None:
        """The module returned ``output``: a traced value in it escapes the module."""
        self.closed = True
        leaves, _ = tree_flatten(output)
        if any(isinstance(v, _Traced) for v in leaves):
            self.fail("a value computed from it is part of the module's output")

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why

    def run(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        """``func`` on the flattened arguments ``leaves`` (``traced``: the traced ones)."""
        with torch._C.DisableTorchFunctionSubclass():  # shapes and aliases below: no tracing
            return self._run(func, leaves, spec, traced)

    def _run(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        data = [v for v in leaves if isinstance(v, torch.Tensor) and self._is_data(v)]
        mine = all(leaves[i]._trace is self for i in traced)
        if self.closed or not mine:
            self.fail("used after its module returned" if self.closed else "mixed with another")
            return _plain(func, leaves, spec)
        if not data:
            if _in_place(func):
                self.fail(f"changed in place by {func.__name__}")
                return _plain(func, leaves, spec)
            return self._traced_result(func, leaves, spec, traced)
        if func in ELEMENTWISE and len(traced) == 1:
            d = leaves[traced[0]]
            shape = _broadcast_shape(leaves)
            if shape and shape[0] == self.n and (d.dim() < len(shape) or d.shape[0] == 1):
                leaves = list(leaves)
                leaves[traced[0]] = self._expanded(d, shape)
                return _plain(func, leaves, spec)
        name = getattr(func, "__name__", str(func))
        self.fail(f"{name} combines it with the samples in a way it cannot be traced through")
        return _plain(func, leaves, spec)

    def _is_data(self, v: torch.Tensor) -> bool:
        """Whether a plain tensor may carry the samples: it requires grad (an activation) or
        has the batch's n samples along axis 0 (an input)."""
        if isinstance(v, _Traced):
            return False
        return v.requires_grad or (v.dim() >= 1 and v.shape[0] == self.n)

    def _expanded(self, d: _Traced, shape: torch.Size) -> torch.Tensor:
        """d given the sample axis of an elementwise result of ``shape``, tapped."""
        value = d.as_subclass(torch.Tensor)
        aligned = value.reshape((1,) * (len(shape) - d.dim()) + tuple(d.shape))
        fn, param, d_shape = d._fn, self.param, tuple(d.shape)
        if _reshaped(value, param):

            def per_sample(grad: torch.Tensor) -> torch.Tensor:
                """d holds the parameter's entries in its own order: the gradients at the
                view, reshaped, are the parameter's (the vector-Jacobian product of a reshape)."""
                return grad.reshape(grad.shape[0], *param.shape)

        else:

            def per_sample(grad: torch.Tensor) -> torch.Tensor:
                """(n, *aligned[1:]) gradients at the view -> (n, *param.shape) of the
                parameter: f's vector-Jacobian products, one per sample."""
                pullback = vjp(fn, param.detach())[1]
                return vmap(lambda g: pullback(g)[0])(grad.reshape(grad.shape[0], *d_shape))

        return self.tap(aligned.expand(self.n, *aligned.shape[1:]), per_sample)

    def _traced_result(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        """Run an op on traced values and constants; its tensor results stay traced."""
        out = _plain(func, leaves, spec)
        fns = {i: leaves[i]._fn for i in traced}
        frozen = list(leaves)

        def replay(q: torch.Tensor) -> Any:
            return _plain(func, [fns[i](q) if i in fns else v for i, v in enumerate(frozen)], spec)

        results, out_spec = tree_flatten(out)
        if not any(isinstance(r, torch.Tensor) for r in results):
            return out
        for k, r in enumerate(results):
            if isinstance(r, torch.Tensor):
                results[k] = _traced(r, self, _part(replay, k))
        return tree_unflatten(results, out_spec)


class _Traced(torch.Tensor):
    """A value computed from a traced parameter: ``_fn`` recomputes it from the parameter."""

    _trace: Trace
    _fn: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        leaves, spec = tree_flatten((args, kwargs or {}))
        traced = [i for i, v in enumerate(leaves) if isinstance(v, _Traced)]
        return leaves[traced[0]]._trace.run(func, leaves, spec, traced)


def _traced(value: torch.Tensor, trace: Trace, fn: Callable[[torch.Tensor], Any]) -> _Traced:
    alias = value.as_subclass(_Traced)
    alias._trace, alias._fn = trace, fn
    return alias


def _part(replay: Callable[[torch.Tensor], Any], k: int) -> Callable[[torch.Tensor], Any]:
    """The function computing result k of a replayed op from the parameter."""

    def part(q: torch.Tensor) -> Any:
        return tree_flatten(replay(q))[0][k]

    return part


def _plain(func: Any, leaves: list[Any], spec: Any) -> Any:
    """``func`` on the leaves as plain tensors (its results are plain tensors too)."""
    args, kwargs = tree_unflatten(leaves, spec)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _reshaped(value: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``value`` is the parameter's memory read in the same order (a view, reshape,
    unsqueeze or no-op cast of it): then f is a reshape, and so is its vector-Jacobian product,
    which spares the per-batch vjp and vmap (a layer-scale gain's ``gamma.reshape(1, -1, 1, 1)``)."""
    return (
        value.dtype == param.dtype
        and value.numel() == param.numel()
        and value.data_ptr() == param.data_ptr()
        and value.is_contiguous()
        and param.is_contiguous()
    )


def _in_place(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS


_IN_PLACE_OPERATORS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__"})


def _broadcast_shape(leaves: list[Any]) -> torch.Size | None:
    """The broadcast shape of the tensors among ``leaves``; None when they do not broadcast or
    it has no axes. Computed here rather than by ``torch.broadcast_shapes``, whose Python
    implementation cost a millisecond per batch on ConvNeXt's gains."""
    shapes = [v.shape for v in leaves if isinstance(v, torch.Tensor)]
    size = max((len(s) for s in shapes), default=0)
    out = [1] * size
    for s in shapes:
        for axis, d in enumerate(s, start=size - len(s)):
            if d != out[axis]:
                if out[axis] != 1 and d != 1:
                    return None
                out[axis] = d if out[axis] == 1 else out[axis]  # the size that is not 1
    return torch.Size(out) if size else None
