"""What the Triton kernel tests share: when they can run, and where (their call counter is
:class:`call_counter.CallCounter`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch

from fisher_fast.fim import triton_products

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the kernels run: the GPU when there is one, else the CPU (Triton's interpreter)."""

_skip_without_triton = pytest.mark.skipif(
    os.environ.get("FISHER_FAST_REQUIRE_TRITON") != "1"
    and not (triton_products.runs_on(torch.device("cpu")) or torch.cuda.is_available()),
    reason="needs Triton, with TRITON_INTERPRET=1 set before import or a CUDA GPU",
)

Test = TypeVar("Test", bound=Callable[..., Any])


def needs_triton(test: Test) -> Test:
    """Skip without Triton (a failure instead where ``FISHER_FAST_REQUIRE_TRITON=1``). On a
    machine with a GPU the kernels run there, so the test is also marked ``cuda``: ``pytest -m
    cuda`` selects it (and, like every ``cuda`` test, it is skipped where fisher_fast was built
    without its CUDA kernels); under the interpreter it is not."""
    marked = _skip_without_triton(test)
    return pytest.mark.cuda(marked) if DEVICE.type == "cuda" else marked


FAR_STRIDE = 2**31 - 2**20
"""A sample stride just under 2^31 elements (so Triton takes it as a 32-bit argument) whose double,
2^32 - 2^21, wraps to -2^21 in 32-bit arithmetic."""

FAR_START = 2**21
"""Where the first sample of :func:`samples_far_apart` starts: where a wrapped offset of the third
sample lands, so 32-bit offsets read other (zero) memory instead of crashing."""


def samples_far_apart(t: torch.Tensor) -> torch.Tensor:
    """A float16 copy of t (3, ...) whose samples lie ``FAR_STRIDE`` elements apart in one
    buffer of 2^32 elements (8 GiB of address space, of which only the three samples' pages are
    touched), so that the offset of sample 2 passes 2^31 elements: a kernel computing it in 32
    bits reads the wrong place. Skips the test where the buffer cannot be reserved."""
    if t.shape[0] != 3:
        raise ValueError(f"samples_far_apart takes 3 samples, got {t.shape[0]}")
    size = FAR_START + 2 * FAR_STRIDE + t[0].numel()
    try:
        buffer = torch.empty(size, dtype=torch.float16, device=t.device)
    except (RuntimeError, MemoryError) as exc:  # a machine that refuses 8 GiB of address space
        pytest.skip(f"cannot reserve {size * 2 / 2**30:.0f} GiB of address space: {exc}")
    sample = torch.empty_like(t[0], memory_format=torch.contiguous_format).stride()
    far = buffer.as_strided(t.shape, (FAR_STRIDE, *sample), FAR_START)
    far.copy_(t)
    return far


BF16_UNIT = 2.0**-8
"""bfloat16's unit roundoff: 8 significant bits, rounded to nearest, so a rounded input is off
by at most 2^-8 of itself (bfloat16 keeps float32's exponent range: no extra underflow)."""

FLOAT32_UNIT = 2.0**-23
"""One float32 ulp per operation: the rounding of float32 sums, doubled so that it also covers
tensor-core adders that truncate."""


def _gamma(count: int) -> float:
    """gamma_k = k v / (1 - k v), v = FLOAT32_UNIT: the relative error bound of a float32 sum of
    k + 1 terms in any order, relative to the sum of their magnitudes."""
    return count * FLOAT32_UNIT / (1 - count * FLOAT32_UNIT)


def square_sum_bound(
    products: torch.Tensor, magnitudes: torch.Tensor, terms: int, input_unit: float
) -> torch.Tensor:
    """Entrywise bound on |F^ - F| for F = sum_n P_n^2, P_n = sum_t g_t x_t a sum of ``terms``
    products per sample, computed with inputs rounded to a relative ``input_unit`` (BF16_UNIT;
    0 for float32 inputs taken as they are), their products summed in float32 and squared and
    summed over samples in float32 (or wider).

    ``products`` (N, ...) are the exact P_n and ``magnitudes`` (N, ...) A_n = sum_t |g_t x_t|, in
    float64. A rounded input pair gives g x (1 + d)(1 + e), |d|, |e| <= u, so each term is off by
    at most (2u + u^2) |g x|; the product of two bfloat16 numbers is exact in float32, whose sum
    of the terms adds at most gamma_T of their magnitudes. So |P^_n - P_n| <= e_n with
    e_n = (2u + u^2 + gamma_T (1 + 2u + u^2)) A_n, hence
    |sum P^_n^2 - sum P_n^2| <= sum_n e_n (2 |P_n| + e_n), and squaring and summing the N
    squares in float32 adds at most gamma_{N+1} sum_n (|P_n| + e_n)^2. Where nothing cancels
    (A_n = |P_n|) this is a relative error of (1 + 2u + u^2)^2 - 1, about 4u = 2^-6 for bfloat16,
    plus float32's share; cancellation inside P_n scales it by A_n / |P_n|."""
    eta = 2 * input_unit + input_unit**2
    err = (eta + _gamma(terms) * (1 + eta)) * magnitudes
    size = products.abs()
    return (err * (2 * size + err)).sum(0) + _gamma(products.shape[0] + 1) * (
        size + err
    ).square().sum(0)
