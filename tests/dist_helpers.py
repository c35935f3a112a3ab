"""Running a test function on several CPU processes joined by a gloo process group on loopback.

:func:`run_ranks` spawns ``world_size`` processes with torch.multiprocessing; each one sets
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), enters
:func:`fisher_fast.distributed.process_group` and calls ``fn(rank, *args)``. Each rank's return
value, or the text of the exception it raised, comes back to the test.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)
"""Process-group timeout in the tests: a hang fails the test instead of blocking it."""


class Outcome(NamedTuple):
    """What one rank returned (``value``) or raised (``error``: type and message)."""

    value: Any
    error: str | None


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torchrun's variables for ``rank`` of a single-machine group on loopback."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def run_ranks(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> list[Outcome]:
    """Call ``fn(rank, *args)`` on ``world_size`` processes in one gloo group; return every
    rank's :class:`Outcome`, in rank order. ``fn`` must be importable (module level)."""
    port = free_port()
    mp.spawn(_rank_main, args=(fn, world_size, port, tmp_path, args), nprocs=world_size)
    return [torch.load(tmp_path / f"outcome-{r}.pt", weights_only=False) for r in range(world_size)]


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    tmp_path: Path,
    args: tuple[Any, ...],
) -> None:
    from fisher_fast.distributed import process_group

    os.environ.update(loopback_env(rank, world_size, port))
    torch.set_num_threads(1)
    try:
        with process_group(timeout=TIMEOUT, backend="gloo"):
            outcome = Outcome(fn(rank, *args), None)
    except Exception as exc:
        traceback.print_exc()  # shown by pytest when the test fails
        outcome = Outcome(None, f"{type(exc).__name__}: {exc}")
    torch.save(outcome, tmp_path / f"outcome-{rank}.pt")
