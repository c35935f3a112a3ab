"""Parameters broadcast over the samples by their module's own forward, given the sample axis.

A ViT's class token (1, 1, D) and position embedding (1, L, D) are used in the model's own
forward (``cls_token.expand(N, -1, -1)``, ``x + pos_embed``), not through a submodule, so no rule
sees them, and their per-sample gradients used to need the whole model re-run per sample. Their
gradient is a sum over the samples only because of the broadcast: while the module runs, the
parameter is replaced by ``p.expand(N, *p.shape[1:])`` (a view, no copy), tapped, and the
gradient arriving at that view is (N, *p.shape[1:]), one slice per sample (summed over the
module's calls when it runs more than once); its squares summed over the samples are the
parameter's entry.

This is exact only if the module treats the expanded view as it treats the broadcast parameter,
sample by sample (``x + p`` and ``p.expand(N, ...)`` do; ``p[0]``, ``p.sum()`` or
``p.squeeze(0)`` may not), so it is never assumed: the planning batch runs with the expansion
and the engine keeps it only when, for a random cotangent on the model's output, the gradient at
each expanded view of the variant batch equals, sample by sample, the parameter's gradient with
that sample run alone (expansion.verify). Otherwise the batch is planned again without.

Candidates: trainable parameters held by one module without a rule (a rule handles its own
parameters). Those with a leading axis of 1 and at least two axes are expanded as above; any
other (a layer-scale gain of shape (C,), a relative-position bias table (distances, heads)) is
traced through its module's forward instead and given the sample axis where it meets the
samples, k rows per sample where the samples are flattened with their windows (traced_use.py).
The parameters of a module with a rule whose calls see no sample (T5's relative-position
Embedding, Swin V2's position-bias MLP on a constant coordinate table) are traced too, once the
first plan finds them (``lookup_candidates``): from the largest module around them all of whose
parameters are such, so that an MLP's Linears share one trace. A traced parameter is kept only
when every use holds as many rows per sample in the variant batch as in the real one (``seen``)
before the gradient check. ``without_traced`` drops the
second kind, for a model that fails with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fisher_fast.fim.rules import find_rule
from fisher_fast.fim.sample_scope import SampleScoped
from fisher_fast.fim.traced_use import PerSample, Trace

if TYPE_CHECKING:
    from fisher_fast.fim.plan import Plan

PATH = "broadcast use expanded to the samples"

# (tensor, hook on its gradient) -> the tapped alias the module uses instead (capture.py)
Tap = Callable[[torch.Tensor, Callable[[torch.Tensor], None]], torch.Tensor]


def broadcast_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{global name: (holder module, local name)} of the parameters that may be given the
    sample axis at their use: trainable, one holder (not tied), and no rule for the holder."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for local, p in module._parameters.items():
            if p is not None and p.requires_grad and p.dim() >= 1:
                holders.setdefault(id(p), []).append((module_name, module, local))
    return {
        (f"{name}.{local}" if name else local): (module, local)
        for ((name, module, local),) in (h for h in holders.values() if len(h) == 1)
        if find_rule(module) is None
    }


def lookup_candidates(model: nn.Module, plan: Plan) -> dict[str, tuple[nn.Module, str]]:
    """{global name: (holder, local name)} for the parameters of modules with a rule that
    ``plan`` sends to per-sample gradients although the module holds them alone, because no
    call of the module sees a sample (``plan.sampleless``): T5's relative-position Embedding,
    looked up with a (T, T) bucket table once for every sample; Swin V2's position-bias MLP,
    run on a constant coordinate table. Their values are then traced through those calls to
    where they meet the samples (traced_use.py), verified as every traced parameter."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for pname in plan.sampleless:
        holder_name, _, local = pname.rpartition(".")
        holder = model.get_submodule(holder_name)
        if plan.paths.get(pname, "").startswith("per-sample gradients") and (
            sum(
                p is holder._parameters[local]
                for _, p in model.named_parameters(remove_duplicate=False)
            )
            == 1
        ):
            found[pname] = (holder, local)
    return found


def without_traced(
    candidates: dict[str, tuple[nn.Module, str]],
) -> dict[str, tuple[nn.Module, str]]:
    """The candidates expanded whole (a leading axis of 1), without those that are traced."""
    return {k: (m, local) for k, (m, local) in candidates.items() if _expanded_whole(m, local)}


def _expanded_whole(module: nn.Module, local: str) -> bool:
    p = module._parameters[local]
    return p is not None and p.dim() >= 2 and p.shape[0] == 1


# A tapped tensor given the sample axis, and the map from its gradient to one parameter's
# per-sample gradients (n, ...): one per use of a parameter in a forward pass.
Use = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class BroadcastParams(SampleScoped):
    """Hooks that give some parameters the sample axis while their module runs.

    Active only inside ``samples(n)`` (the engine's own forward passes, not a fallback's
    per-sample re-run) with grad enabled. Each backward pass, the per-sample gradients from the
    uses collect in ``pending`` (summed over uses and calls); ``end_pass`` hands each
    parameter's to ``sink``. ``uses`` keeps the uses of the forward passes since ``forget``,
    for verification; ``traces`` the traced calls, whose failures ``seen`` leaves out.
    """

    def __init__(self, model: nn.Module, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self._parent = {child: module for module in model.modules() for child in module.children()}
        self._root: dict[nn.Module, nn.Module] = {}  # holder -> the module whose call traces it
        self.armed: dict[str, tuple[nn.Module, str]] = {}
        self.expands_whole = True
        self.uses: dict[str, list[Use]] = {}
        self.traces: list[tuple[str, Trace]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.sink: Callable[[str, torch.Tensor], None] | None = None
        self._handles: list[Any] = []
        # root -> a stack (one per running call) of its swapped (holder, local name, parameter) and
        # trace
        self._swapped: dict[
            nn.Module, list[tuple[list[tuple[nn.Module, str, Any]], Trace | None]]
        ] = {}

    @property
    def names(self) -> set[str]:
        return set(self.armed)

    def seen(self) -> dict[str, tuple[int, ...]]:
        """The parameters given the sample axis at every use since ``forget`` (traced ones: no
        traced call failed, one use at least), each with the rows per sample (k) of its traced
        uses in order (empty for an expanded one)."""
        failed = self.failed()
        blocks: dict[str, tuple[int, ...]] = {name: () for name in self.uses}
        for name, trace in self.traces:
            if name in blocks:
                blocks[name] += tuple(trace.blocks[name])
        return {name: ks for name, ks in blocks.items() if name not in failed}

    def failed(self) -> dict[str, str]:
        """Why tracing failed, for the traced parameters it failed for since ``forget``."""
        why: dict[str, str] = {}
        for name, trace in self.traces:
            if trace.failed is not None:
                why.setdefault(name, trace.failed)
        for name, _ in self.traces:
            if name not in self.uses:
                why.setdefault(name, "no use of it meets the samples")
        return why

    def contained(self) -> set[str]:
        """The parameters used only inside their module's forward since ``forget``: none of
        their traced values left it (an expanded one's never does)."""
        left = {name for name, trace in self.traces if trace.left}
        return set(self.uses) - left

    def end(self, output: Any) -> None:
        """The model's forward pass returned ``output``: close the traces still open (whose
        values left their module), failing those with a value in ``output``."""
        for _, trace in self.traces:
            trace.end(output)

    def complete(self) -> bool:
        """Whether no traced call failed since ``forget`` (a later batch's use that could not
        be given the sample axis would leave its gradient out: that batch is planned anew)."""
        return all(trace.failed is None for _, trace in self.traces)

    def checks(self, name: str) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
        """The tensors of ``name``'s uses, and the map from their gradients to the
        parameter's per-sample gradients (n, ...), for expansion.verify."""
        uses = self.uses[name]

        def per_sample(grads: list[torch.Tensor]) -> torch.Tensor:
            return sum((to(g) for (_, to), g in zip(uses, grads, strict=True)), torch.tensor(0))

        return [t for t, _ in uses], per_sample

    def arm(self, params: dict[str, tuple[nn.Module, str]], expands_whole: bool = True) -> None:
        """Hook the modules whose calls swap the parameters of ``params``: their holders, or
        for holders with a rule, the largest module around them whose parameters all are
        such (``_roots``). ``expands_whole``: parameters with a leading axis of 1 are expanded
        whole (else traced as the others are)."""
        self.disarm()
        self.armed = dict(params)
        self.expands_whole = expands_whole
        self._root = self._roots(params)
        for root in {id(m): m for m in self._root.values()}.values():
            self._handles.append(root.register_forward_pre_hook(self._swap, prepend=True))
            self._handles.append(root.register_forward_hook(self._restore, always_call=True))

    def _roots(self, params: dict[str, tuple[nn.Module, str]]) -> dict[nn.Module, nn.Module]:
        """holder -> the module whose call swaps its parameters in ``params``: the holder
        itself; for an nn.ParameterDict or nn.ParameterList, which is never called, its parent
        (PEFT's IA3 layers read their scaling vectors from one); for a holder with a rule (its
        parameters' calls see no sample), the largest module around it all of whose trainable
        parameters are in ``params``, held by modules with a rule (Swin V2's ``cpb_mlp``, a Sequential of two Linears and a ReLU): the
        parameters inside it are traced together from its call, so that the value of one
        Linear may go into the next."""
        armed = {id(m._parameters[local]) for m, local in params.values()}

        def all_armed(module: nn.Module) -> bool:
            return all(
                id(p) in armed and find_rule(m) is not None
                for m in module.modules()
                for p in m._parameters.values()
                if p is not None and p.requires_grad
            )

        roots = {}
        for holder in {id(m): m for m, _ in params.values()}.values():
            root = holder
            if isinstance(holder, _CONTAINERS) and holder in self._parent:
                root = self._parent[holder]  # never called: its parent reads it
            elif find_rule(holder) is not None:
                while (parent := self._parent.get(root)) is not None and all_armed(parent):
                    root = parent
            roots[holder] = root
        return roots

    def keep_only(self, names: set[str], sink: Callable[[str, torch.Tensor], None]) -> None:
        """Keep the expansion of ``names`` only, their squares going to ``sink``."""
        kept = {n: hm for n, hm in self.armed.items() if n in names} if names else {}
        self.arm(kept, self.expands_whole)
        self.sink = sink

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.armed, self.sink = [], {}, None
        self.forget()

    def forget(self) -> None:
        self.uses, self.traces, self.pending = {}, [], {}

    def end_pass(self) -> None:
        """Hand this backward pass's per-sample gradients to the sink."""
        pending, self.pending = self.pending, {}
        if self.sink is not None:
            for name, grad in pending.items():
                if name in self.armed:  # uses of a planning pass may have others
                    self.sink(name, grad)

    def _swap(self, module: nn.Module, args: Any) -> None:
        if self.n is None or not torch.is_grad_enabled():
            return
        mine: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
        for name, (holder, local) in self.armed.items():
            param = holder._parameters[local] if self._root[holder] is module else None
            if param is not None:
                mine[name] = (holder, local, param)
        traced = {
            name: p
            for name, (holder, local, p) in mine.items()
            if not (self.expands_whole and _expanded_whole(holder, local))
        }
        trace = Trace(self.n, traced, self._use) if traced else None  # one for all: see Trace
        swapped = []
        for name, (holder, local, p) in mine.items():
            if name in traced:
                assert trace is not None
                self.traces.append((name, trace))
                alias = trace.alias(name)
            else:
                alias = self._use(p.expand(self.n, *p.shape[1:]), _named(name), frozenset({name}))
            holder._parameters[local] = alias  # type: ignore[assignment]
            swapped.append((holder, local, p))
        self._swapped.setdefault(module, []).append((swapped, trace))

    def _restore(self, module: nn.Module, args: Any, output: Any) -> None:
        calls = self._swapped.get(module)
        if not calls:  # swapped nothing (no grad, or not in the engine's passes)
            return
        swapped, trace = calls.pop()
        if not calls:
            del self._swapped[module]
        for holder, local, p in swapped:
            holder._parameters[local] = p
        if trace is not None:
            trace.close(output)

    def _use(self, tensor: torch.Tensor, to: PerSample, names: frozenset[str]) -> torch.Tensor:
        """The tapped alias of one use of the parameters ``names``; their per-sample
        gradients (``to``) go to ``pending``."""

        def collect(grad: torch.Tensor) -> None:
            for name, per_sample in to(grad).items():
                before = self.pending.get(name)
                self.pending[name] = per_sample if before is None else before + per_sample

        view = self.tap(tensor, collect)
        for name in names:
            self.uses.setdefault(name, []).append((view, _component(to, name)))
        return view


_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _named(name: str) -> PerSample:
    """The PerSample of a parameter expanded whole: the gradient at its view is its own."""
    return lambda grad: {name: grad}


def _component(to: PerSample, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda grad: to(grad)[name]
