"""Deciding, before the first real pass, which module handles which trainable parameter.

A probe forward on two samples records which modules actually run. A parameter is handled
through the module that owns it when that module runs and has a rule; through the generic
torch.func fallback when it runs without a rule; and when its owner never runs (the parameter
is used by an ancestor's forward, as nn.MultiheadAttention does with out_proj), through the
fallback of the nearest ancestor that runs. Parameters shared by several modules are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fisher_fast.fim.data import call_model, take
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


def called_modules(model: nn.Module, inputs: Any) -> set[nn.Module]:
    """Modules whose forward runs on a two-sample slice of ``inputs`` (with grad enabled, so
    that layers with inference fast paths take the same route as in the real passes)."""
    seen: set[nn.Module] = set()
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.add(mod)) for m in model.modules()
    ]
    try:
        with torch.enable_grad():
            call_model(model, take(inputs, None, 2)[0])
    finally:
        for h in handles:
            h.remove()
    return seen


def make_plan(model: nn.Module, inputs: Any) -> Plan:
    called = called_modules(model, inputs)
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
