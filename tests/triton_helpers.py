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
