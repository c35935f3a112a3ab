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
