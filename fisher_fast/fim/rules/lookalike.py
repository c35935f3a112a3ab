"""Other libraries' versions of torch's layers, recognised by what they compute, not by name.

timm's ``LayerNorm`` subclasses nn.LayerNorm with a forward of its own (a fused kernel where one
is available), and its ``BatchNormAct2d`` subclasses nn.BatchNorm2d with an activation after the
normalisation. A rule written for the base class is exact on such a subclass only if the
subclass computes the same function, which its class cannot tell. So it is *verified*: the
module's own ``forward`` (called directly, so no hook sees the check) runs once, without
gradients, on a random input built for its configuration, and must reproduce the reference
formula to rounding. A subclass that computes something else (other statistics, a weight
transform, a different axis) fails the check and goes to the exact generic path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

# Per module, per check: whether it passed (a module is checked once, when first planned).
_RESULTS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def random_input(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A reproducible input of ``shape`` in the dtype and on the device of the module's
    parameters, with entries of both signs and a nonzero mean (so that centring matters)."""
    like = next(iter(module.parameters()), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.3
    return x.to(like) if like is not None else x.float()


def reproduces(
    module: nn.Module,
    check: str,
    reference: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sums: bool = False,
) -> bool:
    """Whether ``forward(x)`` (by default ``type(module).forward(module, x)``) equals
    ``reference(x)`` to rounding, for ``x = random_input(module, shape)`` (cached per module
    under the name ``check``). Any exception, a non-tensor or a wrongly shaped output is a
    failed check. ``sums``: each output entry is a long sum (a convolution), whose rounding
    depends on the order of its terms, so an entry may differ by the rounding of the output's
    largest entry."""
    own = forward if forward is not None else (lambda x: type(module).forward(module, x))
    return checked_once(
        module, check, lambda: _agrees(own, reference, random_input(module, shape), sums)
    )


def checked_once(module: nn.Module, check: str, test: Callable[[], bool]) -> bool:
    """``test()``, run the first time ``check`` is asked of ``module`` and remembered for as
    long as the module lives."""
    results = _RESULTS.setdefault(module, {})
    if check not in results:
        results[check] = test()
    return results[check]


@torch.no_grad()
def _agrees(
    forward: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor],
    example: torch.Tensor,
    sums: bool = False,
) -> bool:
    try:
        got = forward(example)
        expected = reference(example)
    except Exception:  # a module that does not take this input is not this formula
        return False
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    tol = 1e-2 if example.element_size() <= 2 else 1e-5
    # rounding is relative to the output's scale: an entry near zero (an activation's kink, a
    # large normalised value cancelled by the bias) may differ by more than its own size
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    atol = tol * (1.0 if sums else 1e-2) * scale
    return bool(torch.allclose(got.double(), expected.double(), rtol=tol, atol=atol))
