"""torch's intra-op thread count for work on a probe family.

The small probes (``SMALL_PROBES``: MLP, small CNN and ResNet on 8x8 or 28x28 images) have
tensors too small to gain from threads: on a quiet 2-core machine one thread is as fast as two,
and while other processes use the cores, torch's default of one thread per core made a digits
distance matrix 4-8 times slower than one thread. The
library's entry points therefore run such work on one thread unless told otherwise, and restore
the caller's setting when they return.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fisher_fast.tasks.probes import SMALL_PROBES


def default_threads(arch: str) -> int | None:
    """The thread count work on ``arch`` runs with by default: 1 for the small probes, None
    (torch's own setting, left unchanged) for the others."""
    return 1 if arch in SMALL_PROBES else None


@contextlib.contextmanager
def probe_threads(arch: str, threads: int | None = None) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads (default :func:`default_threads`), then
    restore the previous count. ``threads`` must be positive."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive number of CPU threads, got {threads}")
    wanted = threads if threads is not None else default_threads(arch)
    before = torch.get_num_threads()
    if wanted is not None and wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
