"""Models compiled with ``torch.compile``, run as their original Python code.

A compiled model (an ``OptimizedModule``) or a compiled block inside one runs a graph in which
diag_fim's forward hooks, taps and per-sample re-runs cannot act (Dynamo stops on the hooks'
changes to the module with an internal assertion). diag_fim therefore runs with the compiled
code disabled (``torch.compiler.set_stance("force_eager")``): the modules' own forwards run
eagerly, on the same parameters, so the result is exact and every parameter keeps the name the
model gives it (``_orig_mod.`` included for a compiled model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eagerly() -> Iterator[None]:
    """Inside the block, compiled modules and functions run their original code (a no-op where
    torch has no ``set_stance``, before 2.6, or nothing is compiled)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
