"""Plans kept between diag_fim calls on one model: a later call starts as a later batch does.

Planning a batch (engine.py) costs a second forward pass on a variant batch and, where a
broadcast table or parameter is given the sample axis, forward and backward passes of single
samples to verify it: on the benchmark's BERT about one batch's time, on ResNet-18 a sixth of a
six-batch call. A model whose FIM is computed again (after each task in continual learning, at
every checkpoint, on each task's data for a distance matrix) would pay it every time. So the
plan a call ends with is kept for its model, and the next call on the same model object starts
from it under the checks that every later batch of one call already gets: the batch's module
calls must have the planned layouts (conform.py) and its graph must not reach a parameter
planned as zero (unused.py); a batch that fails either is planned anew, as within a call.

A kept plan is offered only while nothing it was made from has changed (``signature``): the
same module and parameter objects under the same names, parameters of the same shape, dtype,
device and ``requires_grad``, the same forward methods, hooks and training flags, and the same
rule registry. It names modules by their path in the model instead of holding them, and the
cache holds the model weakly, so a model that is dropped is freed with its plan.
``diag_fim(..., reuse_plan=False)`` plans afresh (and keeps the new plan).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Hashable
from dataclasses import dataclass

from torch import nn

from fisher_fast.fim import rules
from fisher_fast.fim.plan import OwnerPlan, Plan, Tie

Signature = tuple[Hashable, ...]


def signature(model: nn.Module) -> Signature:
    """Everything about ``model`` that a plan depends on and a batch's shapes do not show."""
    modules = []
    for name, m in model.named_modules(remove_duplicate=False):
        params = tuple(
            (local, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad)
            for local, p in m._parameters.items()
            if p is not None
        )
        hooks = tuple(
            tuple(hook_dict)
            for hook_dict in (
                m._forward_hooks,
                m._forward_pre_hooks,
                m._backward_hooks,
                m._backward_pre_hooks,
            )
        )
        forward = id(m.__dict__["forward"]) if "forward" in m.__dict__ else None
        modules.append((name, id(m), type(m), m.training, forward, hooks, params))
    registry = (id(rules._RULES), len(rules._RULES), id(rules._MATCHED), len(rules._MATCHED))
    return (tuple(modules), registry, rules.registry_generation())


@dataclass(frozen=True)
class _KeptTie:
    name: str
    embeddings: tuple[str, ...]  # module paths
    head: str | None


@dataclass(frozen=True)
class KeptPlan:
    """A plan with its modules named by path, the Embeddings whose broadcast outputs it gives
    the sample axis, and the parameters it gives the sample axis at their use
    (name -> (holder path, local name))."""

    signature: Signature
    plan: Plan  # without owners and ties: those are kept by path below
    owners: tuple[dict[str, object], ...]  # OwnerPlan fields but the module
    ties: tuple[_KeptTie, ...]
    expanded: tuple[str, ...]
    broadcast: tuple[tuple[str, str, str], ...]

    def attach(
        self, model: nn.Module
    ) -> tuple[Plan, list[nn.Module], dict[str, tuple[nn.Module, str]]]:
        """The plan on ``model``'s modules, the expanded Embeddings, the broadcast parameters."""
        get = model.get_submodule
        owners = [OwnerPlan(module=get(str(o["name"])), **o) for o in self.owners]  # type: ignore[arg-type]
        ties = [
            Tie(t.name, tuple(get(e) for e in t.embeddings), get(t.head) if t.head else None)  # type: ignore[arg-type, misc]
            for t in self.ties
        ]
        plan = dataclasses.replace(self.plan, owners=owners, ties=ties)
        broadcast = {name: (get(path), local) for name, path, local in self.broadcast}
        return plan, [get(path) for path in self.expanded], broadcast


def detach(
    model: nn.Module,
    made_from: Signature,
    plan: Plan,
    expanded: set[nn.Module],
    broadcast: dict[str, tuple[nn.Module, str]],
) -> KeptPlan:
    """``plan`` (and the engine's expansion state) with every module named by its path;
    ``made_from``: the model's ``signature`` when the call began."""
    path = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    owners = tuple(
        {f.name: getattr(o, f.name) for f in dataclasses.fields(o) if f.name != "module"}
        for o in plan.owners
    )
    ties = tuple(
        _KeptTie(
            t.name,
            tuple(path[id(e)] for e in t.embeddings),
            path[id(t.head)] if t.head is not None else None,
        )
        for t in plan.ties
    )
    return KeptPlan(
        signature=made_from,
        plan=dataclasses.replace(plan, owners=[], ties=[]),
        owners=owners,
        ties=ties,
        expanded=tuple(sorted(path[id(m)] for m in expanded)),
        broadcast=tuple((name, path[id(m)], local) for name, (m, local) in broadcast.items()),
    )


_KEPT: weakref.WeakKeyDictionary[nn.Module, KeptPlan] = weakref.WeakKeyDictionary()


def recall(model: nn.Module, now: Signature) -> KeptPlan | None:
    """The plan kept for ``model``, if nothing it was made from has changed since (``now``:
    the model's ``signature``)."""
    kept = _KEPT.get(model)
    if kept is None:
        return None
    if kept.signature != now:
        del _KEPT[model]
        return None
    return kept


def keep(model: nn.Module, kept: KeptPlan) -> None:
    _KEPT[model] = kept


def forget(model: nn.Module | None = None) -> None:
    """Drop the plan kept for ``model`` (every kept plan when None)."""
    if model is None:
        _KEPT.clear()
    else:
        _KEPT.pop(model, None)
