"""Deciding which module handles which trainable parameter, from the modules that actually run.

diag_fim taps every module that directly owns a trainable parameter and records, during the
first batch's forward pass, which modules run (``recording_calls``); ``plan_from_calls`` then
decides. A parameter is handled through the module that owns it when that module runs and has a
rule; through the generic torch.func fallback when it runs without a rule; and when its owner
never runs (the parameter is used by an ancestor's forward, as nn.MultiheadAttention does with
out_proj), through the rule's ``extra_params`` or the fallback of the nearest ancestor that runs
(which then has to be tapped, so that one forward pass is repeated). Parameters shared by several
modules are reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from fisher_fast.fim.rules import Rule, find_rule


@dataclass
class OwnerPlan:
    """How one module's calls contribute: its rule (direct parameters) and fallback parameters."""

    name: str
    module: nn.Module
    rule: Rule | None = None
    rule_params: list[str] = field(default_factory=list)  # local names handled by the rule
    fallback_params: list[str] = field(default_factory=list)  # local dotted names, via torch.func

    def global_name(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local


@dataclass
class Plan:
    owners: list[OwnerPlan]
    unsupported: dict[str, str]  # global parameter name -> why it has no rule


def direct_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module holding a trainable parameter of its own."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if any(p is not None and p.requires_grad for p in module._parameters.values())
    ]


@contextlib.contextmanager
def recording_calls(model: nn.Module) -> Iterator[set[nn.Module]]:
    """Yield a set that collects every submodule of ``model`` whose forward runs meanwhile."""
    seen: set[nn.Module] = set()
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.add(mod)) for m in model.modules()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def plan_from_calls(model: nn.Module, called: set[nn.Module]) -> Plan:
    """The plan, given the modules whose forward ran (see the module docstring)."""
    modules = dict(model.named_modules())
    owners: dict[str, OwnerPlan] = {}
    unsupported: dict[str, str] = {}
    holders: dict[int, list[str]] = {}
    for module_name, module in modules.items():
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad:
                holders.setdefault(id(p), []).append(
                    f"{module_name}.{pname}" if module_name else pname
                )

    for module_name, module in modules.items():
        for pname, p in module._parameters.items():
            if p is None or not p.requires_grad:
                continue
            global_name = f"{module_name}.{pname}" if module_name else pname
            if len(holders[id(p)]) > 1:
                unsupported[global_name] = f"shared by {', '.join(holders[id(p)])}"
                continue
            if module in called:
                plan = owners.setdefault(module_name, OwnerPlan(module_name, module))
                rule = find_rule(module)
                if rule is not None:
                    plan.rule = rule
                    plan.rule_params.append(pname)
                else:
                    plan.fallback_params.append(pname)
                    unsupported[global_name] = f"no rule for {type(module).__name__}"
                continue
            ancestor = _nearest_called_ancestor(module_name, modules, called)
            if ancestor is None:
                unsupported[global_name] = "its module never runs in the forward pass"
                continue
            plan = owners.setdefault(ancestor, OwnerPlan(ancestor, modules[ancestor]))
            local = global_name[len(ancestor) + 1 :] if ancestor else global_name
            if plan.rule is not None and local in getattr(plan.rule, "extra_params", ()):
                plan.rule_params.append(local)
                continue
            plan.fallback_params.append(local)
            unsupported[global_name] = (
                f"used outside {type(module).__name__}.forward, inside {type(modules[ancestor]).__name__}"
            )
    return Plan(list(owners.values()), unsupported)


def _nearest_called_ancestor(
    name: str, modules: dict[str, nn.Module], called: set[nn.Module]
) -> str | None:
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        if modules[prefix] in called:
            return prefix
    return None
