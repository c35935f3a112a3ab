"""Where the forward pass uses each parameter: the module calls around every direct use.

A rule handles a parameter from its module's calls alone: the captured inputs and output
gradients of ``Linear.forward`` give the weight's per-sample gradients there and nowhere else.
A model may also use the parameter outside that forward, as ``F.linear(h, self.embed.weight)``
for a head tied to an embedding, or ``x @ self.proj.weight.T`` in a parent's forward; the rule
would miss those terms and return a wrong number without a sign. So the planning batch's forward
runs under a torch-function mode that records, for every torch function applied to a parameter
of the model whose result carries a gradient, the module calls enclosing it (innermost last).
The planner keeps a rule for a parameter only when every use sits directly in a call of the
modules that rule reads (plan.py); otherwise the parameter takes the per-sample path of the
nearest module that encloses every use.

Uses made by fisher_fast itself (its hooks expand or trace parameters while the model runs) are
not the model's and are left out, as are results without a gradient (``p.shape``, ``p.detach()``:
no term of the gradient flows through them).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_OWN_PACKAGE = __name__.split(".")[0] + "."

# id of a parameter -> the enclosing module calls (outermost first) at each of its uses
Uses = dict[int, list[tuple[nn.Module, ...]]]


class ParamUses(TorchFunctionMode):
    """Records the uses of ``params`` (by id) in ``uses``, reading the enclosing module calls
    from ``stack`` (kept by the caller's forward hooks, innermost last)."""

    def __init__(self, params: set[int], stack: list[nn.Module], uses: Uses) -> None:
        super().__init__()
        self.params = params
        self.stack = stack
        self.uses = uses

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        used = [t for t in tree_leaves((args, kwargs)) if id(t) in self.params]
        if used and _carries_gradient(result) and not _called_by_fisher_fast():
            where = tuple(self.stack)
            for p in used:
                self.uses.setdefault(id(p), []).append(where)
        return result


def _carries_gradient(result: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(result))


# torch's Python wrappers that may stand between a torch function's caller and this mode, and
# the mode that routes a model's F.linear calls (linear_calls.py: the call is the model's)
_WRAPPERS = frozenset(
    {"torch.overrides", "torch.nn.functional", "torch.functional", "torch._tensor", __name__}
    | {"fisher_fast.fim.linear_calls"}
)


def _called_by_fisher_fast() -> bool:
    """Whether the torch function was called from fisher_fast's own code: the nearest frame
    outside torch's wrappers. Anything else counts as the model's use (when in doubt, a use
    is kept: it can only send the parameter to the slower exact path)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "") in _WRAPPERS:
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith(_OWN_PACKAGE)


def model_params(model: nn.Module) -> set[int]:
    """The ids of the model's trainable parameters."""
    return {id(p) for p in model.parameters() if p.requires_grad}


def innermost(uses: list[tuple[nn.Module, ...]]) -> Iterator[nn.Module | None]:
    """The innermost module call of each use (None for a use outside every module call)."""
    for stack in uses:
        yield stack[-1] if stack else None
