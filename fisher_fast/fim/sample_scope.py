"""What the engine's hooks that give broadcast tensors the sample axis have in common.

They (broadcast Embedding outputs, expansion.py; broadcast parameters, broadcast_params.py;
norms in a batch of one sample, one_sample_norms.py) act only inside ``samples(n)``, the engine's own forward passes of a batch
of n samples (not a fallback's per-sample re-run), and are removed when the pass over the data
ends (``installed``), as are the hooks that route F.linear calls (linear_calls.py), which act
in every pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Armed:
    """Hooks of the engine's on the model, removed on leaving ``installed()`` (the pass over
    the data). Subclasses register their hooks and define ``disarm``."""

    def disarm(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.disarm()


class SampleScoped(Armed):
    """Hooks active inside ``samples(n)`` only (``n`` is None outside), disarmed on leaving
    ``installed()``."""

    def __init__(self) -> None:
        self.n: int | None = None

    @contextlib.contextmanager
    def samples(self, n: int | None) -> Iterator[None]:
        """Expand to ``n`` samples during the block (None: expand nothing)."""
        before, self.n = self.n, n
        try:
            yield
        finally:
            self.n = before
