"""What the Triton kernel tests share: when they can run, where, and a call counter."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from fisher_fast.fim import triton_products

needs_triton = pytest.mark.skipif(
    os.environ.get("FISHER_FAST_REQUIRE_TRITON") != "1"
    and not (triton_products.runs_on(torch.device("cpu")) or torch.cuda.is_available()),
    reason="needs Triton, with TRITON_INTERPRET=1 set before import or a CUDA GPU",
)
"""Skip without Triton (a failure instead where ``FISHER_FAST_REQUIRE_TRITON=1``)."""

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Replace ``module.name`` by a wrapper that appends to the returned list at each call."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, counted)
    return calls
