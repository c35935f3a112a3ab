"""What the engine's hooks that give broadcast tensors the sample axis have in common.

Both kinds (broadcast Embedding outputs, expansion.py; broadcast parameters,
broadcast_params.py) act only inside ``samples(n)``, the engine's own forward passes of a batch
of n samples (not a fallback's per-sample re-run), and are removed when the pass over the data
ends (``installed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class SampleScoped:
    """Hooks active inside ``samples(n)`` only (``n`` is None outside), disarmed on leaving
    ``installed()``. Subclasses register their hooks and define ``disarm``."""

    def __init__(self) -> None:
        self.n: int | None = None

    def disarm(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.disarm()

    @contextlib.contextmanager
    def samples(self, n: int | None) -> Iterator[None]:
        """Expand to ``n`` samples during the block (None: expand nothing)."""
        before, self.n = self.n, n
        try:
            yield
        finally:
            self.n = before
