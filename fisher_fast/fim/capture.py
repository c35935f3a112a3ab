"""Forward hooks that record each module call and deliver the gradients at its outputs.

Every output tensor of a recorded call is replaced by an alias made by ``_Tap``, an autograd
Function that also takes a 0-dim "zero" leaf requiring grad; a tensor hook on the alias receives
dL/d(output) during the backward pass. Differentiating only with respect to the zero leaves makes
autograd run every node between the loss and each recorded output, and skip the weight-gradient
products that a plain backward would compute (diag_fim never needs the batch gradient). The
alias is ``detach()`` of the output: it shares storage and version counter (no copy, and
autograd still catches in-place changes to saved tensors) but is not an autograd view, so
in-place operations after the module stay legal (autograd forbids in-place changes to views made
inside a custom Function). The zero leaf's own gradient is a constant, so no reduction over the
output is spent on it.

A module called once with one output is processed as soon as its gradient arrives, so that
gradient is freed early, and in the batch's last backward pass it then lets go of its inputs, so
that autograd frees them once the module's own backward has run, as in a plain backward pass
(held to the end of the batch, every layer input would stay alive through the whole backward
pass); anything else (weight sharing, several outputs) is processed after the
backward pass, when all of its calls' gradients are known.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fisher_fast.fim.rules import INSTRUMENTED, Call, Instrument, Passes
from fisher_fast.fim.traced_use import same_function


class _Tap(torch.autograd.Function):
    """Identity on ``x`` (an alias, no copy) that makes ``x``'s gradient reachable from ``zero``."""

    @staticmethod
    def forward(ctx: Any, zero: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if grad.dim() > 1 and grad.shape[0] == 1 and not grad.is_contiguous():
            # A batch of one: PyTorch's CPU BatchNorm and InstanceNorm backward (eval mode)
            # return wrong gradients for some strides of their output gradient (a transpose
            # after the norm gives (C, 1, W·C, C)); a contiguous copy (one sample) avoids it.
            grad = grad.contiguous()
        return grad.new_zeros(()), grad


Process = Callable[[nn.Module, list[Call]], None]  # runs a module's rule(s), adds the result


def _ignore(module: nn.Module, calls: list[Call]) -> None:
    """The process of a tapped module that has nothing to add (its parameters are handled
    elsewhere or left out)."""


@dataclass
class Owner:
    """A module whose parameters are handled through its calls, and how.

    ``process`` is None until the plan is known (after the first forward pass); a gradient that
    reaches an owner still without one means the module did not run in the first batch.
    """

    name: str
    module: nn.Module
    process: Process | None = None
    instrument: Instrument | None = None  # optional instrumented forward (rules/__init__.py)


class Capture:
    """Installs hooks on the owner modules and routes output gradients to their rules."""

    def __init__(self) -> None:
        self.calls: dict[nn.Module, list[Call]] = {}
        self._owner_of: dict[nn.Module, Owner] = {}
        self._zeros: dict[torch.device, torch.Tensor] = {}
        self._done: set[int] = set()
        self._paused = False
        self._handles: dict[nn.Module, Any] = {}  # the forward hook of each installed owner
        self._instrumented: set[int] = set()  # modules whose current call was instrumented
        self._own_forward: dict[nn.Module, Any] = {}  # instance forwards the instruments replace
        self._installed = False
        self.passes = Passes()  # shared with every rule's context

    def add_owner(self, owner: Owner) -> None:
        """Record calls of ``owner.module`` (from now on when installed, else once installed)."""
        self.calls[owner.module] = []
        self._owner_of[owner.module] = owner
        if self._installed:
            self._install(owner)

    def owns(self, module: nn.Module) -> bool:
        return module in self._owner_of

    def set_process(
        self, module: nn.Module, process: Process, instrument: Instrument | None
    ) -> bool:
        """Give a tapped module its process; False when its instrumented forward has to go
        (the plan does not use the rule it serves), so the batch's forward must run again."""
        owner = self._owner_of[module]
        owner.process = process
        if owner.instrument is not None and instrument is None:
            owner.instrument = None
            if self._installed:
                self._restore_forward(module)
            return False
        return True

    def reset_processes(self) -> None:
        """Forget every owner's process (a new plan is being adopted)."""
        for owner in self._owner_of.values():
            owner.process = None

    def ignore_unplanned(self) -> bool:
        """Owners still without a process add nothing (their parameters are handled elsewhere);
        False when one of them loses its instrumented forward (see ``set_process``). Their calls
        of this batch let go of their inputs now, so that the planning batch's backward pass
        frees activations as a plain one does (the taps still deliver, and drop, gradients)."""
        covered = True
        for module, owner in self._owner_of.items():
            if owner.process is None:
                covered &= self.set_process(module, _ignore, None)
                for call in self.calls.get(module, []):
                    call.release_inputs()
        return covered

    @contextlib.contextmanager
    def installed(self) -> Iterator[Capture]:
        self._installed = True
        for owner in self._owner_of.values():
            self._install(owner)
        try:
            yield self
        finally:
            self._installed = False
            for module in list(self._handles):
                self._uninstall(module)

    def _install(self, owner: Owner) -> None:
        hook = owner.module.register_forward_hook(self._on_forward, with_kwargs=True)
        self._handles[owner.module] = hook
        if owner.instrument is not None:
            instrumented = self._instrumented_forward(owner)
            setattr(instrumented, INSTRUMENTED, True)
            self._own_forward[owner.module] = owner.module.__dict__.get("forward")
            owner.module.forward = instrumented

    def _uninstall(self, module: nn.Module) -> None:
        self._handles.pop(module).remove()
        if self._owner_of[module].instrument is not None:
            self._restore_forward(module)

    def _restore_forward(self, module: nn.Module) -> None:
        """Back to the forward the module had before its instrumented one: the class's, or
        an instance forward of the user's."""
        own = self._own_forward.pop(module, None)
        if own is None:
            del module.forward
        else:
            module.forward = own

    def keep_only(self, modules: set[nn.Module]) -> None:
        """Stop tapping every owner but ``modules`` (between batches: the others are not in
        the plan, so their calls would only cost time)."""
        for module in [m for m in self._owner_of if m not in modules]:
            if module in self._handles:
                self._uninstall(module)
            del self._owner_of[module], self.calls[module]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore module calls (while a rule re-runs a module)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def zero_leaves(self) -> list[torch.Tensor]:
        """The leaves to differentiate with respect to (one per device seen)."""
        return list(self._zeros.values())

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Record one batch's calls, and drop them (inputs, output gradients) when it ends.

        Dropping them is what frees the batch: a call's tensors lead through autograd's C++
        graph to tap hooks that refer back to the call and to this Capture (a recorded input is
        usually another module's tapped output), a reference cycle that Python's garbage
        collector does not see. Kept, every batch's activations and the accumulator would
        outlive diag_fim (measured: 5.5 MiB per call on the benchmark MLP).
        """
        self.forget_calls()
        try:
            yield
        finally:
            self.forget_calls()

    def forget_calls(self) -> None:
        """Drop the calls recorded so far in this batch (and their tensors)."""
        for calls in self.calls.values():
            for call in calls:
                call.forget()
            calls.clear()
        self._zeros.clear()
        self._done.clear()
        self._instrumented.clear()

    def begin_pass(self, index: int, count: int) -> None:
        """Start backward pass ``index`` of ``count`` over the current batch."""
        self.passes.index, self.passes.count = index, count
        self._done.clear()
        for calls in self.calls.values():
            for call in calls:
                call.grads = [None] * len(call.output_meta)

    def end_pass(self) -> None:
        """Process every module not yet processed in this backward pass."""
        for module, calls in self.calls.items():
            if calls and id(module) not in self._done:
                self._process(module, calls)

    def _process(self, module: nn.Module, calls: list[Call]) -> None:
        owner = self._owner_of[module]
        if owner.process is None:
            raise RuntimeError(
                f"{owner.name or 'the model'} ({type(module).__name__}) ran in a later batch but "
                "not in the first one, and diag_fim decides from the first batch's forward pass "
                "which module handles which parameter; make the first batch run every module "
                "(e.g. put samples of every kind in it) or compute the FIM of each branch apart"
            )
        owner.process(module, calls)

    # -- hooks ---------------------------------------------------------------------------------
    def _zero(self, device: torch.device) -> torch.Tensor:
        if device not in self._zeros:
            self._zeros[device] = torch.zeros((), device=device, requires_grad=True)
        return self._zeros[device]

    def _instrumented_forward(self, owner: Owner) -> Callable[..., Any]:
        module, original = owner.module, owner.module.forward
        assert owner.instrument is not None
        instrument = owner.instrument

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._paused or not torch.is_grad_enabled():
                return original(*args, **kwargs)
            call = Call(args=args, kwargs=kwargs)
            output = instrument(module, call, lambda t: self._tap(module, call, t), *args, **kwargs)
            if output is None:
                return original(*args, **kwargs)
            call.grads = [None] * len(call.output_meta)
            self.calls[module].append(call)
            self._instrumented.add(id(module))
            return output

        return forward

    def tap_tensor(
        self, tensor: torch.Tensor, hook: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        """An alias of ``tensor`` whose gradient reaches ``hook`` in the batch's backward passes
        (through the zero leaf, as a module output's does)."""
        tapped = _Tap.apply(self._zero(tensor.device), tensor)
        tapped.register_hook(hook)
        return tapped

    def _tap(self, module: nn.Module, call: Call, tensor: torch.Tensor) -> torch.Tensor:
        """Route tensor's gradient to ``call.grads[k]`` (k: order of taps); return its tap copy."""
        tapped = same_function(tensor, _Tap.apply(self._zero(tensor.device), tensor))
        tapped.register_hook(self._grad_hook(module, call, len(call.output_meta)))
        call.output_meta.append((tensor.shape, tensor.dtype, tensor.device))
        return tapped

    def _on_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if self._paused or not torch.is_grad_enabled():
            return None
        if id(module) in self._instrumented:  # its instrumented forward tapped what it needs
            self._instrumented.discard(id(module))
            return None
        call = Call(args=args, kwargs=kwargs)
        leaves, spec = tree_flatten(output)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                leaves[i] = self._tap(module, call, leaf)
        call.grads = [None] * len(call.output_meta)
        self.calls[module].append(call)
        return tree_unflatten(leaves, spec)

    def _grad_hook(self, module: nn.Module, call: Call, k: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            call.grads[k] = grad
            calls = self.calls[module]
            # a module called once is processed as soon as every tap has its gradient (an
            # instrumented forward's taps, several outputs); a tap that gets none (an output
            # the loss does not reach) leaves it to the end of the pass
            if len(calls) == 1 and all(g is not None for g in call.grads):
                self._process(module, calls)
                self._done.add(id(module))
                call.grads = [None] * len(call.grads)
                if self.passes.last:  # no pass needs its inputs again: let autograd free them
                    call.release_inputs()

        return hook
