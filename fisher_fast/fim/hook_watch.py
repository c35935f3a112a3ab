"""The user's forward hooks that replace a module's output: then no rule may handle the module.

A rule computes a module's parameters' per-sample gradients from its call's inputs and the
gradient at its output, taking the output to be ``module.forward(inputs)``. A forward hook of
the user's that returns a new output (a mask, a scale, another tensor) breaks that: diag_fim's
tap runs after the user's hooks, so it sees the gradient at the hook's result, and the rule
would silently use it as the gradient at the forward's result. Hooks that only look (feature
extraction, logging) return None and change nothing, so they must not cost the fast path.

So every module that has forward hooks of its own when diag_fim starts is watched in the
engine's passes: a hook put before the user's records the output tensors the forward returned,
one put after them compares. A module whose output was replaced or changed in place is in
``changed``; the plan (plan.py) then gives its parameters the per-sample path, whose re-run of
the module runs its hooks too, and a later batch that adds a module to ``changed`` is planned
anew. Hooks registered while diag_fim runs are not watched. Global forward hooks
(``register_module_forward_hook``) run before any hook a module holds, so their effect cannot
be seen: while one is registered, every module counts as changed, and none is watched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from fisher_fast.fim.layout import flat_leaves


class HookWatch:
    """Records the names of the modules whose output a forward hook of the user's replaced.

    Install it before diag_fim's own forward hooks, so that its second hook runs after the
    user's and before the taps (which replace the output with an alias of their own).
    """

    def __init__(self, model: nn.Module) -> None:
        self.changed: set[str] = set()
        self.modules: dict[nn.Module, str] = {}  # the watched modules and their names
        if module_globals._global_forward_hooks:  # they run before anything a module holds
            self.changed = {name for name, _ in model.named_modules()}
        else:
            self.modules = {m: name for name, m in model.named_modules() if m._forward_hooks}
        # the leaves each call's forward returned (held, so that no new tensor takes their
        # address while a hook runs) and their version counters (in-place changes), a stack
        # per module for recursive calls
        self._returned: dict[nn.Module, list[tuple[list[Any], list[int]]]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for m in self.modules:
            handles.append(m.register_forward_hook(self._before_user_hooks, prepend=True))
            handles.append(m.register_forward_hook(self._after_user_hooks))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._returned.clear()

    def _before_user_hooks(self, module: nn.Module, args: Any, output: Any) -> None:
        leaves = flat_leaves(output)
        self._returned.setdefault(module, []).append((leaves, _versions(leaves)))

    def _after_user_hooks(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._returned.get(module)
        if not stack:
            return
        (returned, versions), final = stack.pop(), flat_leaves(output)
        same = len(returned) == len(final) and all(
            a is b for a, b in zip(returned, final, strict=True)
        )
        if not same or _versions(final) != versions:
            self.changed.add(self.modules[module])


def _versions(leaves: list[Any]) -> list[int]:
    """The version counter of each tensor leaf (an in-place change increments it; -1 for a
    tensor that has none, such as an inference tensor)."""
    return [_version(v) for v in leaves if isinstance(v, torch.Tensor)]


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:
        return -1
