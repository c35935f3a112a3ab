"""What the Triton kernel tests share: when they can run, and where (their call counter is
:class:`call_counter.CallCounter`)."""

from __future__ import annotations

import os

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
