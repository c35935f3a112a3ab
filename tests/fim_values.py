"""Random diagonal FIMs and the plain float64 Fréchet distance, shared by the distance and op
tests (a helper module: test modules import it, not each other or conftest)."""

from __future__ import annotations

import math

import torch


def random_fim(
    n: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    zeros: float = 0.0,
) -> torch.Tensor:
    """A positive diagonal with the heavy tail of real FIMs: log-normal, exp(2z) with z standard
    normal, cut at |z| = 5 so that every value (5e-5..2e4) is finite in float16 too.

    ``zeros`` is the fraction of entries set exactly to zero.
    """
    fim = torch.randn(n, generator=gen, dtype=torch.float64).clamp_(-5.0, 5.0).mul_(2.0).exp_()
    if zeros:
        fim[torch.rand(n, generator=gen) < zeros] = 0.0
    return fim.to(dtype=dtype, device=device)


def reference_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Paper eq. 4 computed plainly in float64: unit trace, then ||sqrt(a) - sqrt(b)|| / sqrt(2).

    Free of the cancellation of the three-sum form, so it is accurate for tiny distances too. The
    norm is taken as sqrt(sum of squares): torch.sum adds in a cascade (error ~1e-16 at 10^7
    elements) where torch.linalg.norm has been measured 1e-14 off.
    """
    a = a.detach().cpu().reshape(-1).double()
    b = b.detach().cpu().reshape(-1).double()
    a = a / a.sum()
    b = b / b.sum()
    return math.sqrt((a.sqrt() - b.sqrt()).square().sum().item() / 2)
