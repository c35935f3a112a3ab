"""Broadcast embeddings given the sample axis: position ids shared by every sample, made exact.

GPT-2's ``wpe`` and BERT's ``position_embeddings`` look up ids of shape (1, T) shared by all
samples and return (1, T, D), which the model broadcasts against the (N, T, D) token embeddings.
The gradient arriving at such an output is already summed over the samples, so the Embedding
rule cannot use it, and the parameter used to go to per-sample gradients of an enclosing module
(for GPT-2 the whole transformer, re-run per sample).

Here the output is given the sample axis instead: a forward hook returns
``out.expand(N, *out.shape[1:])`` (a view, no copy), so the gradient at it is (N, T, D), one
slice per sample, and the Embedding rule runs on the ids expanded to (N, T) the same way.
Memory: that gradient, O(N·T·D). This is exact only if the rest of the model treats the expanded
output as it treats the broadcast one, per sample (``h + pos`` does; ``pos[0]`` or
``pos.squeeze(0)`` may not), so it is never assumed. The planning batch is run with the
expansion (every Embedding whose ids and output have a leading axis of size 1 is expanded) and
the expansion is kept only when

1. each expanded call's ids are the same for every sample and its output then holds one slice
   per sample along axis 0 (layout.py, from the real and the variant batch);
2. for a random cotangent on the model's output, the gradient at every output of every module
   the plan reads gradients from (the expanded outputs included), in the variant batch, equals
   block by block the gradient of each of its samples run alone (a batch of one, where the
   expansion changes nothing), and so do the model's outputs.

Otherwise the batch is planned again without any expansion (the per-sample path of before),
never computed with a gradient that may be wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from fisher_fast.fim.data import call_model
from fisher_fast.fim.layout import (
    Broadcast,
    CallLayout,
    Recording,
    Sampled,
    Unknown,
    recording,
    select_samples,
)
from fisher_fast.fim.rules import Call, find_rule
from fisher_fast.fim.sample_scope import SampleScoped

PATH_SUFFIX = "on its broadcast output expanded to the samples"

# gradients at a parameter's uses -> its per-sample gradients (n, ...) (broadcast_params.py)
PerSample = Callable[[list[torch.Tensor]], torch.Tensor]


def expandable(model: nn.Module) -> list[nn.Module]:
    """The Embeddings that may be expanded: a trainable weight and a rule for the module."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.weight.requires_grad and find_rule(m) is not None
    ]


class Expansion(SampleScoped):
    """Forward hooks giving the broadcast outputs of some Embeddings the batch's sample axis.

    A hook expands a call only inside ``samples(n)`` (the engine's own forward passes of the
    model, not a fallback's per-sample re-run) with grad enabled, and only when the ids and the
    output have a leading axis of size 1; ``seen`` records, per module, which of its calls were
    expanded since ``take_seen``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[nn.Module, list[bool]] = {}
        self._handles: dict[nn.Module, Any] = {}

    @property
    def modules(self) -> set[nn.Module]:
        return set(self._handles)

    def arm(self, modules: list[nn.Module]) -> None:
        """Hook exactly ``modules`` (the hooks run before any other forward hook)."""
        self.disarm()
        for m in modules:
            self._handles[m] = m.register_forward_hook(self._hook, with_kwargs=True, prepend=True)

    def keep_only(self, modules: set[nn.Module]) -> None:
        for m in [m for m in self._handles if m not in modules]:
            self._handles.pop(m).remove()

    def disarm(self) -> None:
        self.keep_only(set())
        self.seen = {}

    def take_seen(self) -> dict[nn.Module, list[bool]]:
        seen, self.seen = self.seen, {}
        return seen

    def used(self, seen: dict[nn.Module, list[bool]]) -> bool:
        return any(any(flags) for flags in seen.values())

    def _hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self.n is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        ids = args[0] if args else kwargs.get("input")
        expand = (
            isinstance(ids, torch.Tensor)
            and ids.dim() > 0
            and ids.shape[0] == 1
            and output.dim() > 0
            and output.shape[0] == 1
        )
        self.seen.setdefault(module, []).append(expand)
        return output.expand(self.n, *output.shape[1:]) if expand else None


def validated(
    real: dict[nn.Module, list[bool]],
    variant: dict[nn.Module, list[bool]],
    layouts: Callable[[nn.Module], list[CallLayout | Unknown]],
    n: int,
) -> set[nn.Module] | None:
    """The expanded modules when every call of each was expanded in both batches, with ids the
    same for all samples and the output one slice per sample on axis 0; None otherwise. With
    one sample (n = 1) every (1, ...) is expanded, to itself: modules the variant batch does not
    expand are per-sample ones, left alone."""
    chosen = set()
    for module, flags in real.items():
        if not any(flags) or (n == 1 and not any(variant.get(module, []))):
            continue
        if not all(flags) or variant.get(module) != flags:
            return None
        for layout in layouts(module):
            if not (
                isinstance(layout, CallLayout)
                and isinstance(layout.primary, Broadcast)
                and layout.outputs == [Sampled(0, 1)]
            ):
                return None
        chosen.add(module)
    return chosen


def as_expanded(layout: CallLayout) -> CallLayout:
    """The layout an expanded call has for its rule: ids (1, ...) expanded to (N, ...)."""
    inputs = list(layout.inputs)
    first = next(i for i, v in enumerate(inputs) if v is not None)
    inputs[first] = Sampled(0, 1)
    return CallLayout(inputs, list(layout.outputs))


def with_expanded_ids(calls: list[Call], n: int) -> list[Call]:
    """The calls with their ids (1, ...) expanded to the n samples (views, no copy)."""
    out = []
    for c in calls:
        ids = c.input
        args = (ids.expand(n, *ids.shape[1:]), *c.args[1:])
        out.append(Call(args, c.kwargs, c.output_meta, c.grads, c.saved))
    return out


def verify(
    model: nn.Module,
    inputs: Any,
    n: int,
    index: list[int],
    variant: Recording,
    layouts: Callable[[nn.Module], list[CallLayout | Unknown]],
    owners: list[nn.Module],
    paused: Callable[[], Any],
    one_sample: Callable[[], Any],
    params: Sequence[tuple[list[torch.Tensor], PerSample, torch.Tensor]] = (),
) -> str | None:
    """None when the variant batch (expanded, samples ``index`` of the n) gives at every sampled
    output of ``owners`` the gradients its samples give alone, for a random cotangent on the
    model's sampled outputs, and the same model outputs; else why not (see the module docstring).
    ``one_sample``: the context of the engine's passes of one sample (one_sample_norms.py: a
    norm's backward in a batch of one is otherwise wrong, and the check would fail on that).
    ``params``: (the variant's tensors given the sample axis at a parameter's uses, the map
    from their gradients to the parameter's per-sample gradients, the parameter) of each
    parameter given the sample axis (broadcast_params.py): those must equal, sample by sample,
    the parameter's gradient with the sample alone.
    """
    root_layouts = layouts(model)
    root = variant.calls.get(model, [])
    if len(root) != 1 or not isinstance(root_layouts[0], CallLayout):
        return "the model's call has no known layout"
    # the model's outputs with a sample axis that carry a gradient (an encoder's frozen output
    # returned beside the logits does not), by position, to pick the same from each sample's run
    checked = [
        k
        for k, (t, lay) in enumerate(zip(root[0].outputs, root_layouts[0].outputs, strict=True))
        if isinstance(lay, Sampled) and t.requires_grad
    ]
    sampled_out = [(root[0].outputs[k], cast(Sampled, root_layouts[0].outputs[k])) for k in checked]
    if not sampled_out:
        return "no output of the model has a sample axis"
    generator = torch.Generator().manual_seed(0)
    cotangents = [
        torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
        for t, _ in sampled_out
    ]
    targets: list[tuple[nn.Module, int, int, Sampled]] = []
    for module in owners:
        for c, layout in enumerate(layouts(module)):
            if not isinstance(layout, CallLayout):
                return "an owner's call has no known layout"
            for k, lay in enumerate(layout.outputs):
                if isinstance(lay, Sampled):
                    targets.append((module, c, k, lay))

    def outputs_of(rec: Recording) -> list[torch.Tensor] | None:
        found = []
        for module, c, k, _ in targets:
            calls = rec.calls.get(module, [])
            if len(calls) != len(variant.calls.get(module, [])):
                return None
            found.append(calls[c].outputs[k])
        return found

    def grads(objective: torch.Tensor, at: list[torch.Tensor]) -> list[torch.Tensor]:
        live = [i for i, t in enumerate(at) if t.requires_grad]
        got = torch.autograd.grad(objective, [at[i] for i in live], allow_unused=True)
        result = [torch.zeros_like(t) for t in at]
        for i, g in zip(live, got, strict=True):
            if g is not None:
                result[i] = g
        return result

    batched_at = outputs_of(variant)
    assert batched_at is not None
    objective = sum((v * t).sum() for v, (t, _) in zip(cotangents, sampled_out, strict=True))
    assert isinstance(objective, torch.Tensor)
    uses = [v for vs, _, _ in params for v in vs]
    found = grads(objective, batched_at + uses)
    batched = found[: len(batched_at)]
    batched_params, start = [], len(batched_at)
    for vs, per_sample, _ in params:
        batched_params.append(per_sample(found[start : start + len(vs)]))
        start += len(vs)
    for row, j in enumerate(index):
        with paused(), one_sample(), recording(model) as single:
            call_model(model, select_samples(inputs, n, [j]))
        alone_root = single.calls.get(model, [])
        alone_at = outputs_of(single)
        if len(alone_root) != 1 or alone_at is None:
            return f"sample {j} alone makes other module calls"
        if len(alone_root[0].outputs) != len(root[0].outputs):
            return f"the model returns other outputs for sample {j} alone"
        alone_out = [alone_root[0].outputs[k] for k in checked]
        objective = torch.zeros((), dtype=cotangents[0].dtype, device=cotangents[0].device)
        for v, (t, lay), a in zip(cotangents, sampled_out, alone_out, strict=True):
            if not _agree(_block(t, lay, row), a, t):
                return f"the model's output for sample {j} alone differs"
            objective = objective + (_block(v, lay, row) * a).sum()
        alone = grads(objective, alone_at + [p for _, _, p in params])
        for (module, _, _, lay), g, a in zip(targets, batched, alone[: len(targets)], strict=True):
            if not _agree(_block(g, lay, row), a, g):
                return f"the gradient at a {type(module).__name__} output differs for sample {j}"
        for g, a in zip(batched_params, alone[len(targets) :], strict=True):
            if g[row].numel() != a.numel() or not _agree(g[row].reshape(a.shape), a, g):
                return f"the gradient of a broadcast parameter differs for sample {j}"
    return None


def _block(t: torch.Tensor, layout: Sampled, row: int) -> torch.Tensor:
    return t.narrow(layout.axis, row * layout.k, layout.k)


def _agree(a: torch.Tensor, b: torch.Tensor, whole: torch.Tensor) -> bool:
    """a == b up to rounding relative to the largest entry of ``whole`` (or of b)."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    # In float32 at least (no float64 copies of every output gradient): its rounding is far
    # below the tolerances, which are relative to the largest entry.
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.detach().to(work), b.detach().to(work)
    tol = 2e-2 if whole.element_size() <= 2 else 1e-3
    scale = max(float(whole.detach().abs().max()), float(b.abs().max()))
    worst = float((a - b).abs().max())
    return worst <= tol * scale + 1e-30
