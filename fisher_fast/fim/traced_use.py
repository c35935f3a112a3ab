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
* an op that adds d = f(p) to a tensor that may carry the samples (it requires grad, or has n
  entries along axis 0) with d broadcast along axis 0 of the result, whose axis 0 holds k·n
  entries (k = 1: one per sample; k > 1: the samples flattened with k windows each, as
  ``Sampled(0, k)`` in layout.py), runs on a tapped view of d given that axis
  (``d.expand(k·n, ...)``, no copy). Such ops: elementwise mul, add, sub, div, and the
  attention mask of ``scaled_dot_product_attention`` (added to the logits (k·n, heads, L, S);
  a relative-position bias gathered from its table by a constant index); also an add of d to
  a constant of k·n rows, k > 1 (a shifted-window mask repeated for the batch's windows, whose
  sum with the bias then meets the logits); and a selection entry by entry by a condition that
  carries the samples, with d as one of the operands (``torch.where(padding_mask, bias, min)``,
  ``masked_fill``, as Hugging Face's T5 applies its attention mask to its position bias);
  ``torch.addcmul`` runs as its product and its sum, each traced (ConvNeXt V2's global response
  norm). The gradient at the view, summed over each sample's k rows, is one slice per sample,
  and the parameter's
  per-sample gradients are f's vector-Jacobian products of the slices: vmapped, or, when f
  only moves entries (SELECTIONS: a reshape, a gather by a constant index, a concatenation),
  one index_add of the slices into the entries they are (``_selection``);
* an expansion of a traced value whose axis 0 grows from one row to k rows per sample
  (MPNet's ``bias.expand((batch, -1, T, T)).contiguous()``, later added to the logits in
  place; SigLIP's ``probe.repeat(batch, 1, 1)``, the query of an attention) gives it the
  samples there: the tapped view, expanded as asked, goes on as a plain tensor;
* an op that changes a traced value in place (``nn.ReLU(inplace=True)`` between the Linears of
  Swin V2's position-bias MLP) runs in place, and the value then stands for its result; one
  that would change a parameter's own memory, or a constant, fails the trace;
* an integer tensor that an indexing op reads (``table[index]``, ``F.embedding``) is an index,
  not the samples, whatever the size of its axis 0;
* any other op mixing a traced value with such a tensor (a matrix product), or any op after the
  trace was closed, runs on the real values and marks the use as failed: the parameter then
  takes another path.

A traced value may leave its module (a bias table module whose output its parent adds to the
logits, HF BEiT's ``relative_position_bias``): the trace then stays open until the engine
closes it at the end of the model's forward pass (``Trace.end``), and fails if a traced value
is part of the model's output.

The parameters a module holds are traced together, in one trace per call of it, so that an op
may combine them (BEiT's ``torch.cat((q_bias, k_bias, v_bias))``, added to the output of the
query-key-value projection, linear_calls.py): a value remembers which of them it is computed
from, and the vector-Jacobian products at its use give each of those its per-sample gradients.
A failure of the trace counts for all of them.

None of this is assumed exact: the engine keeps a traced parameter only when the planning batch
verifies it (expansion.verify), as for broadcast_params.py, and when each use holds as many
entries per sample (k) in the variant batch as in the real one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

# The map from the gradient at a tensor given the sample axis to the per-sample gradients
# (n, *shape) of each traced parameter it is computed from, by name.
PerSample = Callable[[torch.Tensor], dict[str, torch.Tensor]]

# (tensor given the sample axis, its PerSample, the names it maps to) -> the tapped alias the
# op uses instead
Tap = Callable[[torch.Tensor, PerSample, frozenset[str]], torch.Tensor]

_T = torch.Tensor
ELEMENTWISE = frozenset(
    {torch.mul, torch.add, torch.sub, torch.div, torch.true_divide}
    | {_T.mul, _T.add, _T.sub, _T.div, _T.mul_, _T.add_, _T.sub_, _T.div_}
    | {_T.__mul__, _T.__rmul__, _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__}
    | {_T.__truediv__, _T.__rtruediv__, _T.__imul__, _T.__iadd__, _T.__isub__, _T.__itruediv__}
)


# Elementwise ops that add a constant: a traced value broadcast along axis 0 and added to a
# constant of k·n rows (k > 1: a shifted-window mask (windows·n, 1, T, T), built from the batch's
# shape) is given the samples there, as the sum goes on to meet the samples' rows.
ADDITIVE = frozenset(
    {torch.add, torch.sub, _T.add, _T.sub, _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__}
)


# Ops whose result's entries are entries of their inputs, moved or repeated (a reshape, a
# permute, a gather by a constant index, a concatenation): a value computed from the parameters
# by these alone is a selection of their entries, whose vector-Jacobian product is an index_add
# (``_selection``), with no per-batch vjp or vmap.
SELECTIONS = frozenset(
    {_T.view, _T.reshape, torch.reshape, _T.permute, torch.permute, _T.transpose}
    | {torch.transpose, _T.contiguous, _T.unsqueeze, torch.unsqueeze, _T.squeeze, torch.squeeze}
    | {_T.expand, _T.flatten, torch.flatten, _T.__getitem__, torch.index_select}
    | {_T.index_select, torch.cat, torch.concat, torch.stack, _T.repeat, F.embedding}
)

# Ops that broadcast a tensor to a larger shape without copying: one whose axis 0 grows from one
# row to k rows per sample gives a traced value the samples (``_expanded_to_samples``).
# A repeat along axis 0 alone of one row is such an expansion, copied (SigLIP's attention-pooling
# probe, ``probe.repeat(batch, 1, 1)``).
_REPEATS = frozenset({_T.repeat})
EXPANSIONS = frozenset({_T.expand, _T.expand_as, _T.broadcast_to, torch.broadcast_to}) | _REPEATS

# Ops that read a tensor at integer indices: an integer tensor among their arguments is an
# index, not the samples, even when its first axis happens to equal the batch's size (Swin's
# relative-position index of T² entries for T tokens per window, T5's (T, T) bucket table). An
# index that does carry the samples (token ids (n, T)) gives a result with a row per sample,
# which is not broadcast where it meets the samples, so it is not traced through that use.
INDEXING = frozenset(
    {_T.__getitem__, torch.index_select, _T.index_select, torch.take, _T.take, F.embedding}
)

# Ops that pick each entry of their result from one operand, by a condition (a padding mask
# applied to a bias: ``torch.where(mask, bias, min)``), as ELEMENTWISE ops combine them: op ->
# position of the condition among its positional arguments (it must not be the traced value).
SELECTING = {torch.where: 0, _T.where: 1, torch.masked_fill: 1, _T.masked_fill: 1}
_CONDITION_KEYS = ("condition", "mask")


class Trace:
    """One call of a module whose parameters ``params`` (name -> tensor) are traced together
    (so that an op may combine them, as ``torch.cat((q_bias, k_bias, v_bias))`` does): the
    batch's n samples, where their expanded uses go (``tap``), and why tracing failed (None
    while it has not; a failure counts for all of them)."""

    def __init__(self, n: int, params: dict[str, torch.Tensor], tap: Tap) -> None:
        self.n, self.params, self.tap = n, params, tap
        self.failed: str | None = None
        self.closed = False
        self.left = False  # a traced value left the module in its output
        # entries per sample (k) of each use of each parameter, in order
        self.blocks: dict[str, list[int]] = {name: [] for name in params}

    def alias(self, name: str) -> torch.Tensor:
        """The traced alias of parameter ``name`` (same values, its gradient reaches it)."""
        with torch._C.DisableTorchFunctionSubclass():
            value = self.params[name].as_subclass(torch.Tensor)
            return _traced(value, self, lambda qs: qs[name], frozenset({name}), True, fresh=True)

    def close(self, output: Any) -> None:
        """The module returned ``output``: closed, unless a traced value leaves the module in
        it (then it stays open until ``end``)."""
        self.left = self._holds(output)
        self.closed = not self.left

    def end(self, output: Any) -> None:
        """The model's forward pass returned ``output``: no traced value may be part of it."""
        if not self.closed and self._holds(output):
            self.fail("a value computed from it is part of the model's output")
        self.closed = True

    def _holds(self, output: Any) -> bool:
        leaves, _ = tree_flatten(output)
        return any(isinstance(v, _Traced) and v._trace is self for v in leaves)

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why

    def run(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        """``func`` on the flattened arguments ``leaves`` (``traced``: the traced ones)."""
        with torch._C.DisableTorchFunctionSubclass():  # shapes and aliases below: no tracing
            return self._run(func, leaves, spec, traced)

    def _run(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        indices = func in INDEXING
        data = [
            v
            for v in leaves
            if isinstance(v, torch.Tensor)
            and self._is_data(v)
            and not (indices and _integer_index(v))
        ]
        mine = all(leaves[i]._trace is self for i in traced)
        if self.closed or not mine:
            self.fail("used after its module returned" if self.closed else "mixed with another")
            return _plain(func, leaves, spec)
        if not data and _in_place(func, leaves, spec):
            return self._in_place(func, leaves, spec, traced)
        shape = _added_shape(func, leaves, spec, traced)
        if shape is not None and (data or func in ADDITIVE):
            d, k = leaves[traced[0]], self._per_sample_rows(shape)
            broadcast = d.dim() < len(shape) or d.shape[0] == 1
            if broadcast and k is not None and (data or (k > 1 and _has_rows(leaves, shape))):
                # a 0-dim value computes in the precision of the tensor it meets (a float32
                # routing weight times a float64 scalar is float32), which its expanded view,
                # no longer 0-dim, would raise: the view is cast to the op's result dtype
                dtype = _result_meta(func, leaves, spec).dtype if d.dim() == 0 else d.dtype
                leaves = list(leaves)
                leaves[traced[0]] = self._expanded(d, shape, k, dtype)
                return _plain(func, leaves, spec)
        if not data and func in EXPANSIONS and len(traced) == 1:
            expanded = self._expanded_to_samples(func, leaves, spec, leaves[traced[0]])
            if expanded is not None:
                return expanded
        if not data:
            return self._traced_result(func, leaves, spec, traced)
        name = getattr(func, "__name__", str(func))
        self.fail(f"{name} combines it with the samples in a way it cannot be traced through")
        return _plain(func, leaves, spec)

    def _in_place(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        """An in-place op on traced values and constants (``nn.ReLU(inplace=True)`` between
        two Linears of a position-bias MLP): allowed on a value computed from the parameters,
        which then stands for the op's result; not on a parameter's own memory, nor on a
        constant (it would hold traced values without being traced)."""
        target = leaves[0]
        name = getattr(func, "__name__", str(func))
        if not traced or traced[0] != 0 or self._shares_a_parameter(target):
            self.fail(f"changed in place by {name}")
            return _plain(func, leaves, spec)
        result = self._traced_result(func, leaves, spec, traced)
        if not isinstance(result, _Traced):
            self.fail(f"changed in place by {name}")
            return result
        target._fn, target._deps, target._selects = result._fn, result._deps, result._selects
        return target

    def _shares_a_parameter(self, value: torch.Tensor) -> bool:
        memory = value.untyped_storage().data_ptr()
        return any(p.untyped_storage().data_ptr() == memory for p in self.params.values())

    def _is_data(self, v: torch.Tensor) -> bool:
        """Whether a plain tensor may carry the samples: it requires grad (an activation) or
        has the batch's n samples along axis 0 (an input)."""
        if isinstance(v, _Traced):
            return False
        return v.requires_grad or (v.dim() >= 1 and v.shape[0] == self.n)

    def _per_sample_rows(self, shape: torch.Size) -> int | None:
        """k when axis 0 of ``shape`` holds k entries for each of the n samples, else None.
        Whether they are each sample's own, k consecutive rows per sample, is not known here:
        the variant batch must give the same k and the planning batch verifies the gradients."""
        rows = shape[0]
        return rows // self.n if rows >= self.n and rows % self.n == 0 else None

    def _expanded(
        self, d: _Traced, shape: torch.Size, k: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """d given axis 0 of a result of ``shape`` (k rows per sample), tapped; in ``dtype``
        (default: d's), its gradients cast back to d's dtype."""
        value = d.as_subclass(torch.Tensor)
        aligned = value.reshape((1,) * (len(shape) - d.dim()) + tuple(d.shape))
        to_params = self._to_params(d, value)
        if dtype is not None and dtype != value.dtype:
            aligned = aligned.to(dtype)
            to_params = functools.partial(_cast_back, value.dtype, to_params)
        per_sample = to_params if k == 1 else functools.partial(_block_sums, k, to_params)
        for name in d._deps:
            self.blocks[name].append(k)
        return self.tap(aligned.expand(self.n * k, *aligned.shape[1:]), per_sample, d._deps)

    def _expanded_to_samples(
        self, func: Any, leaves: list[Any], spec: Any, d: _Traced
    ) -> torch.Tensor | None:
        """An expansion of d whose axis 0 goes from one row to k rows per sample (MPNet's
        ``bias.expand((batch, -1, T, T)).contiguous()``, added later to the logits in place):
        d is given the samples there, the tapped view expanded as asked. None for any other
        expansion, which stays traced."""
        shape = _result_meta(func, leaves, spec).shape
        k = self._per_sample_rows(shape) if shape else None
        if k is None or (d.dim() == len(shape) and d.shape[0] != 1):
            return None
        if func in _REPEATS:  # a copy, tiled along axis 0 alone: the expansion, copied
            if d.dim() != len(shape) or shape[1:] != d.shape[1:]:
                return None
            return self._expanded(d, shape, k).contiguous()
        return self._expanded(d, shape, k).expand(shape)

    def _to_params(self, d: _Traced, value: torch.Tensor) -> PerSample:
        """The map from the gradients at d's view (n, ...), one slice per sample, to the
        per-sample gradients (n, *shape) of each parameter d is computed from."""
        fn, d_shape, names = d._fn, tuple(d.shape), sorted(d._deps)
        params = [self.params[name] for name in names]
        if len(names) == 1 and _reshaped(value, params[0]):
            (name,), (param,) = names, params

            def reshaped(grad: torch.Tensor) -> dict[str, torch.Tensor]:
                """d holds the parameter's entries in its own order: the gradients at the
                view, reshaped, are the parameter's (the vector-Jacobian product of a reshape)."""
                return {name: grad.reshape(grad.shape[0], *param.shape)}

            return reshaped
        if d._selects:
            selected = _selection(fn, d_shape, names, params)
            if selected is not None:
                return selected

        def of_params(*qs: torch.Tensor) -> Any:
            return fn(dict(zip(names, qs, strict=True)))

        def per_sample(grad: torch.Tensor) -> dict[str, torch.Tensor]:
            """(n, *aligned[1:]) gradients at the view -> (n, *shape) of each parameter:
            f's vector-Jacobian products, one per sample."""
            pullback = vjp(of_params, *(p.detach() for p in params))[1]
            grads = vmap(pullback)(grad.reshape(grad.shape[0], *d_shape))
            return dict(zip(names, grads, strict=True))

        return per_sample

    def _traced_result(self, func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> Any:
        """Run an op on traced values and constants; its tensor results stay traced."""
        out = _plain(func, leaves, spec)
        fns = {i: leaves[i]._fn for i in traced}
        deps = frozenset().union(*(leaves[i]._deps for i in traced))
        selects = func in SELECTIONS and all(leaves[i]._selects for i in traced)
        frozen = list(leaves)

        def replay(qs: dict[str, torch.Tensor]) -> Any:
            return _plain(func, [fns[i](qs) if i in fns else v for i, v in enumerate(frozen)], spec)

        results, out_spec = tree_flatten(out)
        if not any(isinstance(r, torch.Tensor) for r in results):
            return out
        for k, r in enumerate(results):
            if isinstance(r, torch.Tensor):
                fresh = all(r is not v for v in leaves)  # not an argument returned as is
                results[k] = _traced(r, self, _part(replay, k), deps, selects, fresh)
        return tree_unflatten(results, out_spec)


class _Traced(torch.Tensor):
    """A value computed from traced parameters: ``_fn`` recomputes it from them (a dict by
    name), ``_deps`` names those it reads."""

    _trace: Trace
    _fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    _deps: frozenset[str]
    _selects: bool  # computed by SELECTIONS alone: its entries are the parameters' or constants

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in _ADDCMUL:  # as its elementwise ops, each traced (ConvNeXt V2's GRN)
            return _addcmul(*args, **(kwargs or {}))
        leaves, spec = tree_flatten((args, kwargs or {}))
        traced = [i for i, v in enumerate(leaves) if isinstance(v, _Traced)]
        return leaves[traced[0]]._trace.run(func, leaves, spec, traced)


_ADDCMUL = frozenset({torch.addcmul, _T.addcmul})


def _addcmul(
    input: torch.Tensor, tensor1: torch.Tensor, tensor2: torch.Tensor, *, value: float = 1
) -> torch.Tensor:
    """``input + value · tensor1 · tensor2`` by its elementwise ops, so that a traced value
    among them meets the samples in a product or a sum that traces it (ConvNeXt V2's global
    response norm: ``torch.addcmul(bias, weight, x * x_n)``, both parameters traced)."""
    product = tensor1 * tensor2
    return input + (product if value == 1 else value * product)


def same_function(source: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """``alias``, an identity's result on ``source`` (a module output's tap, capture.py): when
    ``source`` is traced, the alias is the same function of the parameter, not that of the
    identity's own ops (a ``detach``, whose vector-Jacobian product would be zero)."""
    if isinstance(source, _Traced) and isinstance(alias, _Traced):
        alias._fn, alias._deps, alias._selects = source._fn, source._deps, source._selects
    return alias


def _cast_back(
    dtype: torch.dtype, to_params: PerSample, grad: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradients at a view cast to a lower precision, cast back to the value's before the
    map to the parameters."""
    return to_params(grad.to(dtype))


def _block_sums(k: int, to_params: PerSample, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients at a view of k·n rows, k consecutive rows per sample: summed over each
    sample's rows (its windows), then mapped to the parameters by ``to_params``."""
    return to_params(grad.reshape(grad.shape[0] // k, k, *grad.shape[1:]).sum(1))


def _has_rows(leaves: list[Any], shape: torch.Size) -> bool:
    """Whether a plain tensor among ``leaves`` holds axis 0 of ``shape`` itself."""
    return any(
        isinstance(v, torch.Tensor)
        and not isinstance(v, _Traced)
        and v.dim() == len(shape)
        and v.shape[0] == shape[0]
        for v in leaves
    )


def _added_shape(func: Any, leaves: list[Any], spec: Any, traced: list[int]) -> torch.Size | None:
    """The shape of the tensor that the one traced value among ``leaves`` is broadcast to and
    added to (or multiplied with, or selected from) by ``func``, entry by entry; None for any
    other op. For
    ``scaled_dot_product_attention`` with the traced value as the attention mask: the logits'
    shape, (..., L, S) from the query (..., L, E) and the key (..., S, E)."""
    if len(traced) != 1:
        return None
    if func in ELEMENTWISE:
        return _broadcast_shape(leaves)
    if func in SELECTING:
        args, kwargs = tree_unflatten(leaves, spec)
        at = SELECTING[func]
        condition = (
            args[at]
            if len(args) > at
            else next((kwargs[k] for k in _CONDITION_KEYS if k in kwargs), None)
        )
        return None if condition is leaves[traced[0]] else _broadcast_shape(leaves)
    if func is not F.scaled_dot_product_attention:
        return None
    args, kwargs = tree_unflatten(leaves, spec)
    named = dict(zip(("query", "key", "value", "attn_mask"), args, strict=False)) | kwargs
    query, key, mask = named.get("query"), named.get("key"), named.get("attn_mask")
    if mask is not leaves[traced[0]] or not all(
        isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key)
    ):
        return None
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
    logits = (*query.shape[:-1], key.shape[-2])
    shape = _broadcast_of([logits, (*key.shape[:-2], 1, 1), tuple(mask.shape)])
    return shape if shape is not None and tuple(shape[-2:]) == logits[-2:] else None


def _traced(
    value: torch.Tensor,
    trace: Trace,
    fn: Callable[[dict[str, torch.Tensor]], Any],
    deps: frozenset[str],
    selects: bool,
    fresh: bool = False,
) -> _Traced:
    """``value`` as a traced value. A ``fresh`` tensor (no one else holds it) becomes one
    itself rather than through an alias: an alias is a view, and a view made inside a custom
    Function (a module output's tap, capture.py) may not be changed in place afterwards, as
    ``nn.ReLU(inplace=True)`` does."""
    alias: _Traced
    if fresh and type(value) is torch.Tensor:
        value.__class__ = _Traced
        alias = cast(_Traced, value)
    else:
        alias = value.as_subclass(_Traced)
    alias._trace, alias._fn, alias._deps, alias._selects = trace, fn, deps, selects
    return alias


_BLOCK = 2**22  # each code lies in a block of its own, at a random offset within it


def _codes(total: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``total`` distinct float64 integer codes, code i in block ``b[i]`` of _BLOCK values (b a
    random permutation) at a random offset in it, and the entry of each block: a value that is
    not one of the codes (a code plus one, twice a code) is in some block but hits that
    block's code with a chance of 1 in 2^22."""
    blocks = torch.randperm(total, device=device)
    offsets = torch.randint(0, _BLOCK, (total,), device=device)
    codes = (blocks * _BLOCK + offsets).to(torch.float64)
    entry_of_block = torch.empty_like(blocks)
    entry_of_block[blocks] = torch.arange(total, device=device)
    return codes, entry_of_block


def _selection(
    fn: Callable[[dict[str, torch.Tensor]], Any],
    d_shape: tuple[int, ...],
    names: list[str],
    params: list[torch.Tensor],
) -> PerSample | None:
    """The per-sample map of a value that is a selection of the parameters' entries (and of
    constants): which entry of which parameter each of its entries is, found by computing it
    from distinct random codes (``_codes``) in place of the parameters, and from the
    parameters: an entry is a parameter entry's when the codes give its code, a constant's when
    both give the same value. The gradients at the value's entries, added into
    the parameter entries they are (index_add), are then the per-sample gradients. None when
    the codes do not come out so (an op that is not a selection after all, or that refuses
    float64 codes); the planning batch verifies the map as any other."""
    total = sum(p.numel() for p in params)
    if total >= 2**31:  # codes below 2^53, exact in float64
        return None
    device = params[0].device
    codes, entry_of_block = _codes(total, device)
    values = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
    outs = []
    for inputs in (codes, values):
        qs, start = {}, 0
        for name, p in zip(names, params, strict=True):
            qs[name] = inputs[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        try:
            with torch.no_grad():
                out = fn(qs)
        except (RuntimeError, TypeError):
            return None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != d_shape:
            return None
        outs.append(out.to(torch.float64).reshape(-1))
    got_codes, got_values = outs
    block = torch.div(got_codes, _BLOCK, rounding_mode="floor").long().clamp(0, total - 1)
    index = entry_of_block[block]
    from_params = got_codes == codes[index]
    if not bool((from_params | (got_codes == got_values)).all()):
        return None
    positions = from_params.nonzero().squeeze(1)
    entries = index[positions]
    bounds, start = [], 0
    for p in params:
        mine = (entries >= start) & (entries < start + p.numel())
        bounds.append((positions[mine], entries[mine] - start, p))
        start += p.numel()

    def per_sample(grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """(n, *d_shape) gradients at the value -> (n, *shape) of each parameter: each entry's
        gradient added into the parameter entry it is."""
        flat = grad.reshape(grad.shape[0], -1)
        out = {}
        for name, (at, entry, p) in zip(names, bounds, strict=True):
            total_grad = flat.new_zeros(flat.shape[0], p.numel())
            total_grad.index_add_(1, entry, flat[:, at])
            out[name] = total_grad.reshape(flat.shape[0], *p.shape).to(p.dtype)
        return out

    return per_sample


def _part(
    replay: Callable[[dict[str, torch.Tensor]], Any], k: int
) -> Callable[[dict[str, torch.Tensor]], Any]:
    """The function computing result k of a replayed op from the parameters."""

    def part(qs: dict[str, torch.Tensor]) -> Any:
        return tree_flatten(replay(qs))[0][k]

    return part


def _plain(func: Any, leaves: list[Any], spec: Any) -> Any:
    """``func`` on the leaves as plain tensors (its results are plain tensors too)."""
    args, kwargs = tree_unflatten(leaves, spec)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _result_meta(func: Any, leaves: list[Any], spec: Any) -> torch.Tensor:
    """``func``'s result as a shape-only (meta) tensor, with its shape and dtype: a repeat's is
    known without making its copy."""
    meta = [
        torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
        for v in leaves
    ]
    return _plain(func, meta, spec)


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


def _integer_index(v: torch.Tensor) -> bool:
    """Whether ``v`` can only be an index (an integer dtype; bool and uint8 may be masks)."""
    return not (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype in _MASKS)


_MASKS = frozenset({torch.bool, torch.uint8})


def _in_place(func: Any, leaves: list[Any], spec: Any) -> bool:
    """Whether ``func`` changes its first argument in place (``relu_``, ``add_``, ``+=``, or a
    functional op called with ``inplace=True``)."""
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS:
        return True
    return tree_unflatten(leaves, spec)[1].get("inplace") is True


_IN_PLACE_OPERATORS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__"})


def _broadcast_shape(leaves: list[Any]) -> torch.Size | None:
    """The broadcast shape of the tensors among ``leaves``; None when they do not broadcast or
    it has no axes. Computed here rather than by ``torch.broadcast_shapes``, whose Python
    implementation cost a millisecond per batch on ConvNeXt's gains."""
    return _broadcast_of([tuple(v.shape) for v in leaves if isinstance(v, torch.Tensor)])


def _broadcast_of(shapes: list[tuple[int, ...]]) -> torch.Size | None:
    """The broadcast shape of ``shapes``; None when they do not broadcast or it has no axes."""
    size = max((len(s) for s in shapes), default=0)
    out = [1] * size
    for s in shapes:
        for axis, d in enumerate(s, start=size - len(s)):
            if d != out[axis]:
                if out[axis] != 1 and d != 1:
                    return None
                out[axis] = d if out[axis] == 1 else out[axis]  # the size that is not 1
    return torch.Size(out) if size else None
