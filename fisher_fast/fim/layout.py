"""Where the samples are in each module call: established from two batch sizes, never assumed.

The per-layer rules and the per-sample fallback are exact only along the call's sample axis.
Real models break "axis 0 is the sample axis" in ordinary ways: inputs without a sample axis
that are broadcast later (position ids of shape (1, T)), sequence-first layouts ((T, N, D)),
samples flattened with windows or tokens into one axis ((N·W, T, C)), one module called on
inputs of different layouts. So diag_fim runs the first batch twice: the real batch of N samples,
and a small *variant* batch made of some of its samples in another order (m ≠ N of them, under
no_grad). For every tensor a module call sees or returns, comparing the two calls tells

* ``Sampled(axis, k)``: the axis whose size is k·N in one and k·m in the other, holding each
  sample's k entries as one contiguous block, sample after sample: the variant's block j equals
  the real batch's block of the sample it was made from (checked on values, so a batch
  statistic or a reordering is not mistaken for a sample axis);
* ``Broadcast``: same shape and same values in both (no sample dependence: a shared table);
* ``Unknown``: anything else (the call mixes samples, or its shape depends on N otherwise).

Values are compared with a tolerance for rounding that depends on the batch size (BLAS blocking).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fisher_fast.fim.param_uses import ParamUses, Uses, model_params


@dataclass(frozen=True)
class Sampled:
    """Samples along ``axis``, ``k`` consecutive entries per sample (k = 1: one per sample)."""

    axis: int
    k: int = 1


@dataclass(frozen=True)
class Broadcast:
    """No sample axis: the same tensor for every sample (shape kept to check later batches);
    ``differentiable``: it requires grad (an output's gradient, if any, then arrives summed
    over the samples)."""

    shape: tuple[int, ...]
    differentiable: bool = False


@dataclass(frozen=True)
class Unknown:
    why: str
    coupled: bool = False  # the values show the samples depend on each other (``compare``)


LeafLayout = Sampled | Broadcast | Unknown | None  # None: not a tensor


@dataclass
class CallLayout:
    """Layouts of one call's flattened inputs (args then kwargs) and outputs.

    ``outputs`` lists the floating-point output tensors only, in the order diag_fim taps them.
    """

    inputs: list[LeafLayout]
    outputs: list[LeafLayout]

    @property
    def primary(self) -> LeafLayout:
        """The first input tensor's layout (the layer input of every built-in layer)."""
        return next((v for v in self.inputs if v is not None), None)

    def per_sample(self) -> str | None:
        """None when every sample's output depends on that sample alone along a single axis
        per tensor (k = 1), so a per-sample re-run of the call is exact; else why not."""
        for where, leaves in (("input", self.inputs), ("output", self.outputs)):
            for i, v in enumerate(leaves):
                if isinstance(v, Unknown):
                    return f"{where} {i}: {v.why}"
                if isinstance(v, Sampled) and v.k != 1:
                    return f"{where} {i} holds {v.k} entries per sample along axis {v.axis}"
                if where == "output" and isinstance(v, Broadcast) and v.differentiable:
                    return (
                        f"output {i} is the same for every sample and carries a gradient, which "
                        "arrives summed over the samples (a table shared by later calls)"
                    )
        if not any(isinstance(v, Sampled) for v in self.outputs):
            return "no output has a sample axis (it is the same for every sample)"
        return None

    def uniform(self) -> Sampled | None:
        """The common Sampled layout of the first input and every output, if there is one."""
        first = self.primary
        if not isinstance(first, Sampled) or not self.outputs:
            return None
        return first if all(v == first for v in self.outputs) else None


@dataclass
class Record:
    """One recorded module call: flattened inputs, floating-point outputs, enclosing calls."""

    module: nn.Module
    inputs: list[Any]
    outputs: list[torch.Tensor]
    structure: Any  # tree specs of (inputs, outputs), to match calls across the two passes
    enclosing: tuple[nn.Module, ...]


@dataclass
class Recording:
    calls: dict[nn.Module, list[Record]] = field(default_factory=dict)
    uses: Uses = field(default_factory=dict)  # direct parameter uses, when tracked (param_uses.py)
    stack: list[nn.Module] = field(default_factory=list)  # the module calls running now


def flat_leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts (dict values in order), as torch's pytree
    flattens them for those types, without its per-node registry lookups (this runs on every
    recorded call). Anything else is one leaf."""
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in flat_leaves(item)]
    if isinstance(tree, dict):
        return [leaf for item in tree.values() for leaf in flat_leaves(item)]
    return [tree]


def _structure(tree: Any) -> Any:
    """What must match between two calls for their leaves to correspond one to one."""
    if isinstance(tree, (tuple, list)):
        return (type(tree), tuple(_structure(item) for item in tree))
    if isinstance(tree, dict):
        return (type(tree), tuple((k, _structure(v)) for k, v in tree.items()))
    return None


@contextlib.contextmanager
def recording(model: nn.Module, track_uses: bool = False) -> Iterator[Recording]:
    """Record every module call of ``model`` (inputs, outputs, the calls around it) and, with
    ``track_uses``, the calls around every direct use of a parameter (param_uses.py)."""
    rec = Recording()
    stack = rec.stack
    handles = []

    def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
        stack.append(module)

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stack.pop()
        if not torch.is_grad_enabled():  # diag_fim's taps skip such calls too: no gradient
            return
        ins, outs = flat_leaves((args, kwargs)), flat_leaves(output)
        floats = [t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()]
        structure = (_structure((args, kwargs)), _structure(output))
        rec.calls.setdefault(module, []).append(
            Record(module, ins, floats, structure, tuple(stack))
        )

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        if track_uses:
            with ParamUses(model_params(model), stack, rec.uses):
                yield rec
        else:
            yield rec
    finally:
        for h in handles:
            h.remove()


def variant_indices(n: int) -> list[int]:
    """Samples of the real batch (of n) that make the variant batch: a different count, in
    another order where possible, so that layout and independence can both be told apart."""
    if n == 1:
        return [0, 0]
    if n == 2:
        return [1, 0, 1]
    return [1, 0]


def select_samples(inputs: Any, n: int, index: list[int]) -> Any:
    """The batch made of samples ``index`` of ``inputs``: every tensor whose axis 0 has the
    batch's n samples is indexed; anything else (a broadcast tensor, a flag) is passed as is."""
    picker = torch.tensor(index)

    def pick(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v.index_select(0, picker.to(v.device))
        return v

    return tree_map(pick, inputs)


# Non-tensor arguments that cannot carry state from one call to the next.
_PLAIN = (
    type(None), bool, int, float, complex, str, bytes, slice, type, enum.Enum,
    torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size,
)  # fmt: skip


def compare(
    real: Any,
    variant: Any,
    n: int,
    index: list[int],
    reaches_loss: Callable[[torch.Tensor], bool] | None = None,
) -> LeafLayout:
    """The layout of one tensor seen as ``real`` (n samples) and ``variant`` (samples index);
    ``reaches_loss``: whether a gradient flows to the tensor from the loss (None: whenever it
    requires grad), for a Broadcast's ``differentiable``."""
    if not isinstance(real, torch.Tensor):
        if isinstance(real, _PLAIN) and not _same_plain(real, variant):
            return Unknown(
                f"it takes {real!r} for {n} samples but {variant!r} for {len(index)} (the "
                "batch's size in a shape, say), which no per-sample re-run would be given"
            )
        if isinstance(real, _PLAIN) or real is Ellipsis:
            return None
        return Unknown(
            f"it takes a {type(real).__name__} object, which may keep state between calls "
            "(a cache), so the call is not re-run per sample"
        )
    if not isinstance(variant, torch.Tensor) or variant.dim() != real.dim():
        return Unknown("its rank depends on the number of samples")
    m = len(index)
    changed = [a for a in range(real.dim()) if real.shape[a] != variant.shape[a]]
    if not changed:
        if _close(real, variant):
            flows = real.requires_grad and (reaches_loss is None or reaches_loss(real))
            return Broadcast(tuple(real.shape), flows)
        return Unknown(
            "same shape for any number of samples but values that depend on them", coupled=True
        )
    if len(changed) > 1:
        return Unknown(f"axes {changed} all change with the number of samples")
    axis = changed[0]
    size, small = real.shape[axis], variant.shape[axis]
    if size % n or small % m or size // n != small // m:
        return Unknown(f"axis {axis} has {size} entries for {n} samples and {small} for {m}")
    k = size // n
    blocks = torch.tensor([i * k + j for i in index for j in range(k)], device=real.device)
    if not _close(real.index_select(axis, blocks), variant):
        return Unknown(
            f"axis {axis} grows with the number of samples, but its entries are not each "
            "sample's own (samples interact, or are not laid out one block per sample)",
            coupled=True,
        )
    return Sampled(axis, k)


def _same_plain(a: Any, b: Any) -> bool:
    """Whether two plain arguments (``_PLAIN``) are the same value (NaN the same as NaN)."""
    if a is b:
        return True
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an __eq__ that does not compare: take them as different
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal (integers) or equal up to batch-size-dependent rounding (floating point)."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return bool(torch.equal(a, b))
    if a.numel() == 0:
        return True
    a, b = a.detach(), b.detach().to(a.dtype)
    tol = 2e-2 if a.element_size() <= 2 else 1e-3
    worst, scale = torch.stack([(a - b).abs().max(), a.abs().max()]).double().tolist()
    if not math.isfinite(worst) or not math.isfinite(scale):  # compare the finite entries
        finite = torch.isfinite(a)
        if not bool(torch.equal(finite, torch.isfinite(b))):
            return False
        a, b = a.masked_fill(~finite, 0), b.masked_fill(~finite, 0)
        worst, scale = torch.stack([(a - b).abs().max(), a.abs().max()]).double().tolist()
    return worst <= tol * scale + 1e-30


class Layouts(Mapping[nn.Module, list["CallLayout | Unknown"]]):
    """Per module, the layout of each of its calls in the real pass (matched by order with the
    variant's), computed when first asked for: planning only asks about the modules that hold
    parameters and, where those need it, their ancestors."""

    def __init__(
        self,
        real: Recording,
        variant: Recording,
        n: int,
        index: list[int],
        loss_graph: set[Any] | None = None,
    ) -> None:
        """``loss_graph``: the autograd nodes of the tensor the loss is computed on (None: take
        every output that requires grad as reaching the loss)."""
        self.real, self.variant, self.n, self.index = real, variant, n, index
        self.loss_graph = loss_graph
        self._done: dict[nn.Module, list[CallLayout | Unknown]] = {}

    def _reaches_loss(self, t: torch.Tensor) -> bool:
        if self.loss_graph is None or t.grad_fn is None:  # a leaf that requires grad: assume so
            return True
        return t.grad_fn in self.loss_graph

    def __getitem__(self, module: nn.Module) -> list[CallLayout | Unknown]:
        if module not in self._done:
            self._done[module] = self._compute(module, self.real.calls[module])
        return self._done[module]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.real.calls)

    def __len__(self) -> int:
        return len(self.real.calls)

    def _compute(self, module: nn.Module, calls: list[Record]) -> list[CallLayout | Unknown]:
        n, index = self.n, self.index
        others = self.variant.calls.get(module, [])
        if len(others) != len(calls):
            why = Unknown(
                f"called {len(calls)} times for {n} samples but {len(others)} times for "
                f"{len(index)} (the calls depend on the data)"
            )
            return [why] * len(calls)
        result: list[CallLayout | Unknown] = []
        for r, v in zip(calls, others, strict=True):
            if r.structure != v.structure:
                result.append(Unknown("its inputs or outputs are structured differently"))
                continue
            result.append(
                CallLayout(
                    [compare(a, b, n, index) for a, b in zip(r.inputs, v.inputs, strict=True)],
                    [
                        compare(a, b, n, index, self._reaches_loss)
                        for a, b in zip(r.outputs, v.outputs, strict=True)
                    ],
                )
            )
        return result


def shape_matches(layout: LeafLayout, shape: tuple[int, ...] | None, n: int) -> bool:
    """Whether a later batch's tensor of this shape (None: not a tensor) of n samples still
    fits the planned layout."""
    if layout is None or isinstance(layout, Unknown):
        return True
    if shape is None:
        return False
    if isinstance(layout, Broadcast):
        return tuple(shape) == layout.shape
    return len(shape) > layout.axis and shape[layout.axis] == layout.k * n


def to_sample_first(t: torch.Tensor, layout: Sampled, n: int) -> torch.Tensor:
    """(…, k·N at ``axis``, …) -> (N, k, …) with the sample axis first (k kept as an axis)."""
    t = t.movedim(layout.axis, 0)
    if layout.k == 1:
        return t
    return t.reshape(n, layout.k, *t.shape[1:])
