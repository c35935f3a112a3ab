"""Deciding which module call handles which trainable parameter, from the first batch.

diag_fim records every module call of the first batch twice (the real batch and a variant of
another size, see layout.py), so each call's sample axis is known. A parameter is then handled

1. by its module's **rule**, when the module holds it alone, runs, every one of its calls
   has a layout the rule is exact on, and the forward uses the parameter nowhere but directly
   in those calls (param_uses.py; or by an ancestor's rule that lists it in
   ``extra_params``, as nn.MultiheadAttention does for ``out_proj``); or, for a parameter
   broadcast over the samples by its module's own forward (a ViT's class token, a layer-scale
   gain), by its gradient at its use given the sample axis, once verified
   (broadcast_params.py, traced_use.py). ``F.linear`` on an nn.Linear's weight, outside that
   Linear, is routed through the Linear while the model runs (linear_calls.py), so it is one
   of the Linear's calls;
2. else by **per-sample gradients** (torch.func, fallback.py) of the nearest module, starting
   from its own and going up to the whole model, that contains every use of the parameter and
   whose calls are per-sample separable: each input and output is per sample along one axis or
   the same for every sample. A parameter shared by several modules starts from their nearest
   common ancestor, so its per-sample gradient is summed over every use before it is squared
   (except Embeddings sharing a weight, alone or with one Linear head: their rules, the
   embeddings' calls joined, plus the cross term with the head, rules/tied.py). A module
   re-run per sample inside an ancestor that is re-run anyway joins the ancestor's re-run;
3. and when not even the whole model's call is separable, it is an error naming the parameter
   and why.

A parameter that no holder runs and the output's graph does not reach is zero (unused.py).

Step 1 may also be refused by ``on_unsupported`` (fisher_fast/fim/options.py). An Embedding
whose broadcast output the engine gave the sample axis (expansion.py, ``expanded``) gets its
rule on the ids expanded to the samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from fisher_fast.fim.broadcast_params import PATH as BROADCAST_PATH
from fisher_fast.fim.expansion import PATH_SUFFIX, as_expanded
from fisher_fast.fim.layout import Broadcast, CallLayout, Recording, Unknown
from fisher_fast.fim.param_uses import innermost
from fisher_fast.fim.rules import RuleSpec, find_rule
from fisher_fast.fim.rules.scaled_embedding import row_scale
from fisher_fast.fim.unused import PATH as UNUSED_PATH


@dataclass
class OwnerPlan:
    """How one module's calls contribute: its rule's parameters and its per-sample ones."""

    name: str
    module: nn.Module
    layouts: list[CallLayout]  # of each call: all known, or the module would not be an owner
    rule: RuleSpec | None = None
    rule_params: list[str] = field(default_factory=list)  # local names, by the rule
    fallback_params: list[str] = field(default_factory=list)  # local dotted names, per sample
    aliases: dict[str, str] = field(default_factory=dict)  # local -> global name (tied weights)
    expanded: bool = False  # its calls' broadcast outputs were given the sample axis

    def global_name(self, local: str) -> str:
        if local in self.aliases:
            return self.aliases[local]
        return f"{self.name}.{local}" if self.name else local


@dataclass(frozen=True)
class Tie:
    """A weight shared by nn.Embeddings and at most one nn.Linear head, all handled by their
    rules: the embeddings' calls joined, plus the cross term with the head (rules/tied.py)."""

    name: str  # the parameter's name in the result
    embeddings: tuple[nn.Embedding, ...]
    head: nn.Linear | None


@dataclass
class Plan:
    owners: list[OwnerPlan]
    # global parameter name -> how it is handled ("rule Linear", "per-sample gradients of ...")
    paths: dict[str, str]
    # global name -> why no rule handles it (it goes to per-sample gradients, or is refused)
    unsupported: dict[str, str]
    impossible: dict[str, str]  # global name -> why nothing can handle it exactly
    ties: list[Tie] = field(default_factory=list)
    broadcast: list[str] = field(default_factory=list)  # given the sample axis (broadcast_params)
    unused: list[str] = field(default_factory=list)  # zero: not reached by the output (unused.py)
    # modules whose output a forward hook of the user's replaced: no rule (hook_watch.py)
    replaced: frozenset[str] = frozenset()
    # caller path -> the Linears whose F.linear calls in it are routed through them
    # (linear_calls.py), set by the engine
    linear_calls: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # held alone by a module with a rule whose every call sees no sample (a lookup by a
    # constant table of ids, an MLP on a constant coordinate table): traceable to where their
    # result meets the samples (broadcast_params.lookup_candidates)
    sampleless: list[str] = field(default_factory=list)
    # whether parameters of ``broadcast`` with a leading axis of 1 are expanded whole (else
    # traced as the others are), set by the engine
    expands_whole: bool = True


def direct_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module holding a trainable parameter of its own."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if any(p is not None and p.requires_grad for p in module._parameters.values())
    ]


def _describe(name: str, module: nn.Module) -> str:
    return f"'{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


class _Planner:
    def __init__(
        self,
        model: nn.Module,
        recording: Recording,
        layouts: Mapping[nn.Module, list[CallLayout | Unknown]],
        expanded: frozenset[nn.Module],
        broadcast: frozenset[str],
        replaced: frozenset[str],
        contained: frozenset[str] = frozenset(),
    ) -> None:
        self.modules = dict(model.named_modules())
        self.names = {module: name for name, module in self.modules.items()}
        self.expanded = expanded
        self.broadcast = broadcast
        self.contained = contained
        self.broadcast_holders: dict[str, str] = {}  # contained broadcast parameter -> holder
        self.recording = recording
        self.layouts = layouts
        self.owners: dict[str, OwnerPlan] = {}
        self.replaced = {self.modules[name] for name in replaced if name in self.modules}
        self.plan = Plan([], {}, {}, {}, replaced=replaced)

    def owner(self, name: str) -> OwnerPlan:
        if name not in self.owners:
            module = self.modules[name]
            known = [c for c in self.layouts.get(module, []) if isinstance(c, CallLayout)]
            assert len(known) == len(self.layouts.get(module, [])), "owners have known layouts"
            self.owners[name] = OwnerPlan(name, module, known, expanded=module in self.expanded)
        return self.owners[name]

    def ran(self, module: nn.Module) -> bool:
        return bool(self.recording.calls.get(module))

    def stray_use(self, p: nn.Parameter, readers: set[nn.Module]) -> str | None:
        """Where ``p`` is used other than directly in a call of ``readers`` (the modules whose
        calls the rule reads), None when nowhere (param_uses.py)."""
        for module in innermost(self.recording.uses.get(id(p), [])):
            if module not in readers:
                return (
                    f"also used in {_describe(self.names[module], module)}.forward"
                    if module is not None
                    else "also used outside the model's forward"
                )
        return None

    def encloses_uses(self, ancestor: nn.Module, p: nn.Parameter) -> bool:
        """Every direct use of ``p`` happens inside a call of ``ancestor``."""
        return all(ancestor in stack for stack in self.recording.uses.get(id(p), []))

    def use_sites(self, p: nn.Parameter) -> list[str]:
        """The names of the innermost module calls of ``p``'s direct uses."""
        return [self.names[m] for m in innermost(self.recording.uses.get(id(p), [])) if m]

    def rule_fits(self, module: nn.Module, rule: RuleSpec | None) -> bool:
        if rule is None or module in self.replaced:
            return False
        calls = self.layouts[module]
        if module in self.expanded:  # the rule sees the ids expanded (expansion.py)
            calls = [as_expanded(c) if isinstance(c, CallLayout) else c for c in calls]
        return all(rule.accepts(module, c) for c in calls)

    def sees_no_samples(self, module: nn.Module) -> bool:
        """Every call of ``module`` has only inputs and outputs without a sample axis."""
        calls = self.layouts.get(module, [])
        return bool(calls) and all(
            isinstance(c, CallLayout)
            and all(v is None or isinstance(v, Broadcast) for v in [*c.inputs, *c.outputs])
            for c in calls
        )

    def separable(self, module: nn.Module) -> str | None:
        """None when every call of ``module`` is per-sample separable, else why not."""
        for i, layout in enumerate(self.layouts.get(module, [])):
            why = layout.why if isinstance(layout, Unknown) else layout.per_sample()
            if why is not None:
                return f"call {i}: {why}"
        return None

    def contains_uses(self, ancestor: nn.Module, holders: list[nn.Module]) -> bool:
        """Every call of every holder happens inside a call of ``ancestor`` (or is one)."""
        for h in holders:
            if h is ancestor:
                continue
            for record in self.recording.calls.get(h, []):
                if ancestor not in record.enclosing:
                    return False
        return True

    def chain(self, start: str) -> list[str]:
        """``start`` and its ancestors, nearest first, up to the model itself ("")."""
        parts = start.split(".") if start else []
        return [".".join(parts[:d]) for d in range(len(parts), -1, -1)]

    def handle(self, pname: str, holders: list[tuple[str, nn.Module, str]], reached: bool) -> None:
        """Plan one parameter; holders are (module name, module, local name) of every module
        holding it in its own ``_parameters``; ``reached``: the output's graph reaches it."""
        plan = self.plan
        if not reached and not any(self.ran(h[1]) for h in holders):
            plan.paths[pname] = UNUSED_PATH
            plan.unused.append(pname)
            return
        p = holders[0][1]._parameters[holders[0][2]]
        assert p is not None
        if len(holders) == 1:
            mname, module, local = holders[0]
            rule = find_rule(module)
            stray = self.stray_use(p, {module})
            if self.ran(module) and self.rule_fits(module, rule) and stray is None:
                assert rule is not None
                o = self.owner(mname)
                o.rule = rule
                o.rule_params.append(local)
                plan.paths[pname] = f"rule {rule.name}"
                if module in self.expanded:
                    plan.paths[pname] += f" {PATH_SUFFIX}"
                return
            if pname in self.broadcast:
                plan.paths[pname] = BROADCAST_PATH
                plan.broadcast.append(pname)
                if pname in self.contained:
                    self.broadcast_holders[pname] = mname
                return
            if rule is not None and self.ran(module) and self.sees_no_samples(module):
                plan.sampleless.append(pname)
            start = _common_prefix([mname, *self.use_sites(p)])
            if rule is None:
                no_rule = f"no rule for {type(module).__name__}"
            elif not self.ran(module):
                no_rule = f"used outside {type(module).__name__}.forward"
            elif module in self.replaced:
                no_rule = f"a forward hook replaces the output of {type(module).__name__}"
            elif stray is not None:
                no_rule = stray
            else:
                no_rule = f"{rule.name} does not fit the layout of its calls"
            if not self.ran(module):
                for ancestor in self.chain(mname)[1:]:
                    a = self.modules[ancestor]
                    if not self.ran(a):
                        continue
                    a_rule = find_rule(a)
                    rel = pname[len(ancestor) + 1 :] if ancestor else pname
                    if (
                        a_rule is not None
                        and rel in a_rule.extra_params
                        and self.rule_fits(a, a_rule)
                        and self.stray_use(p, {a}) is None
                    ):
                        o = self.owner(ancestor)
                        o.rule = a_rule
                        o.rule_params.append(rel)
                        plan.paths[pname] = f"rule {a_rule.name} of {_describe(ancestor, a)}"
                        return
                    break
        else:
            if self.tie(pname, p, holders):
                return
            names = [h[0] for h in holders]
            start = _common_prefix([*names, *self.use_sites(p)])
            no_rule = "shared by " + ", ".join(f"{h[0]}.{h[2]}" if h[0] else h[2] for h in holders)
        plan.unsupported[pname] = no_rule
        reasons = []
        mods = [h[1] for h in holders]
        for ancestor in self.chain(start):
            a = self.modules[ancestor]
            if not self.ran(a):
                continue
            why = self.separable(a)
            if why is None and not (self.contains_uses(a, mods) and self.encloses_uses(a, p)):
                why = "some uses of the parameter happen outside its calls"
            if why is None:
                o = self.owner(ancestor)
                rel = pname[len(ancestor) + 1 :] if ancestor else pname
                o.fallback_params.append(rel)
                plan.paths[pname] = f"per-sample gradients of {_describe(ancestor, a)}"
                return
            reasons.append(f"{_describe(ancestor, a)}: {why}")
        plan.impossible[pname] = (
            "no module containing it is per-sample separable (" + "; ".join(reasons) + ")"
            if reasons
            else "no module containing it runs in the forward pass"
        )

    def tie(self, pname: str, p: nn.Parameter, holders: list[tuple[str, nn.Module, str]]) -> bool:
        """Plan a weight shared by Embeddings (nn.Embedding, or a subclass scaling its rows by a
        constant, all by the same one) and at most one nn.Linear head (each holding it as
        ``weight``) through their rules (rules/tied.py), when every rule fits and the forward
        uses the weight only in their calls; holders that never run are left out (T5's
        ``shared``, whose weight its encoder and decoder embeddings use). False to take the
        generic path."""
        running = [h for h in holders if self.ran(h[1])]
        embeddings = [h for h in running if isinstance(h[1], nn.Embedding) and h[2] == "weight"]
        heads = [h for h in running if isinstance(h[1], nn.Linear) and h[2] == "weight"]
        if not embeddings or len(heads) > 1 or len(embeddings) + len(heads) != len(running):
            return False
        for _, e, _ in embeddings:
            assert isinstance(e, nn.Embedding)
            if e.max_norm is not None or e.scale_grad_by_freq:
                return False
        if len({e.padding_idx for _, e, _ in embeddings}) != 1:
            return False
        if not all(self.rule_fits(m, find_rule(m)) for _, m, _ in running):
            return False
        scales = {row_scale(e) for _, e, _ in embeddings}  # one rule for all of them: one scale
        if len(scales) != 1 or None in scales:
            return False
        if self.stray_use(p, {m for _, m, _ in running}) is not None:
            return False
        for name, module, _ in running:
            o = self.owner(name)
            o.rule = find_rule(module)
            o.rule_params.append("weight")
            o.aliases["weight"] = pname
        head = heads[0][1] if heads else None
        assert head is None or isinstance(head, nn.Linear)
        tied = tuple(e for _, e, _ in embeddings)
        self.plan.ties.append(Tie(pname, tied, head))  # type: ignore[arg-type]
        joined = f" (the calls of {len(tied)} embeddings joined)" if len(tied) > 1 else ""
        embedding_rule = find_rule(tied[0])
        assert embedding_rule is not None
        self.plan.paths[pname] = (
            f"rules {embedding_rule.name}{joined} and linear_rule, tied (with their cross term)"
            if head is not None
            else f"rule {embedding_rule.name}{joined}"
        )
        if any(e in self.expanded for e in tied):
            self.plan.paths[pname] += f", the embedding {PATH_SUFFIX}"
        return True

    def merge_nested_fallbacks(self) -> None:
        """A module re-run per sample inside an ancestor that is re-run per sample anyway: its
        parameters join the ancestor's (one re-run instead of two; the ancestor's calls contain
        all of the module's, so all uses of its parameters)."""
        for name in sorted(self.owners, key=len):  # outermost first
            inner = self.owners[name]
            if not inner.fallback_params:
                continue
            for ancestor in self.chain(name)[1:]:
                outer = self.owners.get(ancestor)
                if outer is None or not outer.fallback_params:
                    continue
                if not self.contains_uses(outer.module, [inner.module]):
                    break
                prefix = name[len(ancestor) + 1 :] if ancestor else name
                for local in inner.fallback_params:
                    global_name = inner.global_name(local)
                    outer.fallback_params.append(f"{prefix}.{local}")
                    self.plan.paths[global_name] = (
                        f"per-sample gradients of {_describe(ancestor, outer.module)}"
                    )
                inner.fallback_params = []
                break

    def join_fallbacks(self) -> None:
        """A parameter given the sample axis in its module's forward (and only there), whose
        module is re-run per sample anyway for other parameters (timm BEiT's attention, for
        its query and value biases), joins that re-run: its traced use would only add work."""
        for pname, mname in self.broadcast_holders.items():
            holder = self.modules[mname]
            for ancestor in self.chain(mname):
                outer = self.owners.get(ancestor)
                if outer is None or not outer.fallback_params:
                    continue
                if self.contains_uses(outer.module, [holder]):
                    outer.fallback_params.append(pname[len(ancestor) + 1 :] if ancestor else pname)
                    self.plan.paths[pname] = (
                        f"per-sample gradients of {_describe(ancestor, outer.module)}"
                    )
                    self.plan.broadcast.remove(pname)
                break


def _common_prefix(names: list[str]) -> str:
    """The nearest common ancestor of dotted module names."""
    split = [n.split(".") if n else [] for n in names]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def make_plan(
    model: nn.Module,
    recording: Recording,
    layouts: Mapping[nn.Module, list[CallLayout | Unknown]],
    expanded: frozenset[nn.Module] = frozenset(),
    broadcast: frozenset[str] = frozenset(),
    reached: frozenset[int] | None = None,
    replaced: frozenset[str] = frozenset(),
    contained: frozenset[str] = frozenset(),
) -> Plan:
    """The plan for ``model`` given its recorded calls and their layouts (module docstring);
    ``expanded``: the Embeddings whose broadcast outputs were given the sample axis;
    ``broadcast``: the parameters given the sample axis at their use (broadcast_params.py);
    ``reached``: the ``id`` of every parameter the output's graph reaches (unused.py), None
    to take every parameter as reached; ``replaced``: the names of the modules whose output a
    forward hook of the user's replaced (hook_watch.py); ``contained``: those of ``broadcast``
    used only inside their module's forward, which join a per-sample re-run of it (or of an
    ancestor) that the plan makes anyway."""
    planner = _Planner(model, recording, layouts, expanded, broadcast, replaced, contained)
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    first_name: dict[int, str] = {}
    for module_name, module in planner.modules.items():
        for local, p in module._parameters.items():
            if p is None or not p.requires_grad:
                continue
            holders.setdefault(id(p), []).append((module_name, module, local))
            first_name.setdefault(id(p), f"{module_name}.{local}" if module_name else local)
    for key, hs in holders.items():
        planner.handle(first_name[key], hs, reached is None or key in reached)
    planner.merge_nested_fallbacks()
    planner.join_fallbacks()
    planner.plan.owners = [o for o in planner.owners.values() if o.rule_params or o.fallback_params]
    return planner.plan
