"""``F.linear`` on an nn.Linear's weight outside that Linear, routed through the Linear's call.

timm's BEiT, EVA and Swin V2 attentions hold ``self.qkv = nn.Linear(dim, 3 * dim, bias=False)``
but compute ``F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))``: the Linear
never runs, so its rule sees no call, and the weight's direct use in the attention's forward
(param_uses.py) sent it, with the attention's own biases, to a per-sample re-run of the
attention. So such a call, made in the forward of another module (the *caller*), is replaced by
the Linear's call:

    F.linear(x, lin.weight, b) = lin(x) + b     (lin without a bias, b not None)
    F.linear(x, lin.weight, lin.bias) = lin(x)  (lin.bias None or not)

and not otherwise (without a bias, a Linear that has one would add it), nor for a Linear with
forward hooks of the user's, or while global ones are registered (they would run on a call the
model never makes). The Linear's call is
then an ordinary module call: recorded with its layouts, tapped, its weight handled by the
Linear rule; the caller's bias ``b``, computed from its own parameters, is added entry by entry,
which traced_use.py gives the sample axis. The result equals the functional call's up to
rounding (the bias is added after the product instead of within it).

Only calls made in the forward of a module without a rule are routed (a rule reads its module's
calls as they are). The planning batch's forward pass finds the calls to route (``finding``: a torch-function mode
over the whole pass, beside the one recording parameter uses, which then sees the weight used
inside the Linear's call); every later pass routes the same ones (``arm``: the mode is active
only inside the callers' calls, including the verification's runs of single samples and a
per-sample re-run of an ancestor, where the routed call is the same function). The plan keeps
them (``Plan.linear_calls``), a later batch whose callers make other calls is planned anew
(conform.py), and the hooks are removed when diag_fim's pass over the data ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeGuard

import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals
from torch.overrides import TorchFunctionMode

from fisher_fast.fim.rules import find_rule, rule_of_class
from fisher_fast.fim.sample_scope import Armed

# caller module path -> the paths of the Linears whose F.linear calls it makes are routed
Routes = dict[str, tuple[str, ...]]


class LinearCalls(Armed):
    """Finds and routes the ``F.linear`` calls on the model's Linears' weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): name for name, m in model.named_modules()}
        self.linears = {id(m.weight): m for m in model.modules() if _routable(m)}
        self._handles: list[Any] = []
        self._modes: list[_Route] = []
        self._running: dict[int, int] = {}  # id of a routed Linear -> its calls running now

    @contextlib.contextmanager
    def finding(self, stack: list[nn.Module]) -> Iterator[Routes]:
        """Route every routable call during the block and collect the routes (filled when the
        block ends); ``stack``: the module calls running (innermost last), kept by the caller's
        hooks (layout.recording)."""
        found: dict[str, set[str]] = {}

        def route(lin: nn.Linear) -> bool:
            # not in a module with a rule, which reads its calls as they are (nn.MultiheadAttention's
            # handles its out_proj's weight, which its forward passes to F.linear), the Linear's
            # own forward's call included
            if not stack or find_rule(stack[-1]) is not None:
                return False
            found.setdefault(self.names[id(stack[-1])], set()).add(self.names[id(lin)])
            return True

        routes: Routes = {}
        with _Route(self.linears, route):
            yield routes
        routes.update({c: tuple(sorted(ls)) for c, ls in sorted(found.items())})

    def arm(self, routes: Routes) -> None:
        """Route the calls of ``routes`` (only those) from now on."""
        self.disarm()
        for caller, paths in routes.items():
            targets: dict[int, nn.Linear] = {}
            for path in paths:
                lin = self.model.get_submodule(path)
                assert isinstance(lin, nn.Linear)
                targets[id(lin.weight)] = lin
                self._handles.append(lin.register_forward_pre_hook(self._started))
                self._handles.append(lin.register_forward_hook(self._ended, always_call=True))
            module = self.model.get_submodule(caller)
            self._handles.append(module.register_forward_pre_hook(self._enter(targets)))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _started(self, module: nn.Module, args: Any) -> None:
        self._running[id(module)] = self._running.get(id(module), 0) + 1

    def _ended(self, module: nn.Module, args: Any, output: Any) -> None:
        self._running[id(module)] -= 1

    def _enter(self, targets: dict[int, nn.Linear]) -> Callable[[nn.Module, Any], None]:
        def route(lin: nn.Linear) -> bool:
            return not self._running.get(id(lin))  # not the Linear's own forward's call

        def pre(module: nn.Module, args: Any) -> None:
            mode = _Route(targets, route)
            mode.__enter__()
            self._modes.append(mode)

        return pre

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._modes.pop().__exit__(None, None, None)


def _routable(module: nn.Module) -> TypeGuard[nn.Linear]:
    """Whether ``module(x)`` computes ``F.linear(x, module.weight, module.bias)`` and nothing
    else: an nn.Linear with the base class's rule (a subclass only when its forward is verified
    to match), with no forward hook of the user's on it (taken when diag_fim starts, before its
    own) and no global one, which would run on a routed call that the model itself never makes
    (and might change its output)."""
    if not isinstance(module, nn.Linear) or not isinstance(module.weight, nn.Parameter):
        return False
    if find_rule(module) is not rule_of_class(nn.Linear):
        return False
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
    )


class _Route(TorchFunctionMode):
    """Replaces ``F.linear`` on the weight of one of ``targets`` (id of weight -> Linear) by
    the Linear's call, plus the bias given when it is not the Linear's own, where ``route``
    allows it (never in the Linear's own forward, whose call this is)."""

    def __init__(self, targets: dict[int, nn.Linear], route: Callable[[nn.Linear], bool]) -> None:
        super().__init__()
        self.targets = targets
        self.route = route

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
            lin = self.targets.get(id(named.get("weight")))
            bias = named.get("bias")
            if lin is not None and (bias is lin.bias or lin.bias is None) and self.route(lin):
                out = lin(named["input"])
                return out if bias is lin.bias else out + bias
        return func(*args, **kwargs)
