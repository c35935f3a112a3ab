"""The context diag_fim runs the model in: its own Python code, in its own dtype.

* A model compiled with ``torch.compile`` (an ``OptimizedModule``), or a compiled block inside
  one, runs a graph in which diag_fim's forward hooks, taps and per-sample re-runs cannot act
  (Dynamo stops on the hooks' changes to the module with an internal assertion). The compiled
  code is disabled (``torch.compiler.set_stance("force_eager")``): the modules' own forwards run
  eagerly, on the same parameters, so the result is exact and every parameter keeps the name
  the model gives it (``_orig_mod.`` included for a compiled model).
* Under a caller's ``torch.autocast``, products would run in a lower precision than the
  parameters and their gradients, which the rules' products refuse to mix. diag_fim computes
  the FIM of the model in its own dtype (as the library's training loops do), so autocast is
  switched off inside, with an :class:`AutocastIgnoredWarning`; cast the model to compute it in
  a lower precision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


class AutocastIgnoredWarning(UserWarning):
    """diag_fim was called under torch.autocast, which it switches off inside."""


@contextlib.contextmanager
def model_as_written() -> Iterator[None]:
    """Inside the block, compiled modules and functions run their original code (where torch
    has ``set_stance``, 2.6 and later) and autocast is off."""
    with contextlib.ExitStack() as stack:
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        on = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if on:
            warnings.warn(
                f"diag_fim runs the model in its own dtype: the torch.autocast of {', '.join(on)} "
                "is switched off inside it (cast the model, e.g. model.bfloat16(), to compute "
                "the FIM in a lower precision)",
                AutocastIgnoredWarning,
                stacklevel=4,
            )
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
