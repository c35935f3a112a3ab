"""torch.distributed plumbing shared by the whole package: the process group, who is who, and
sharing per-rank work so that all ranks fail together instead of hanging.

Launch with torchrun (``torchrun --nproc-per-node 2 -m fisher_fast.cli distance ...``): it sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`init_from_env` (or the :func:`process_group` context manager) turns them into a process
group whose backend follows the device the work runs on (:func:`backend_for`): gloo for the
CPU, nccl for CUDA (each process on GPU ``LOCAL_RANK``). Every collective waits at most ``timeout``;
initialise your own groups with a timeout too
(``torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))``),
otherwise a crashed rank leaves the others waiting for the backend's default (30 minutes for
gloo, 10 for nccl, or forever with NCCL error handling disabled).

Without a process group every function here describes a single process: rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

T = TypeVar("T")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)
"""How long a rank waits at a collective for the others. Work between two collectives (e.g. one
rank's share of probe trainings) must fit in it, so it is generous; a rank that raises never
makes the others wait for it (see :func:`all_outcomes`)."""

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankError(RuntimeError):
    """Work failed on one or more ranks; raised on every rank, naming the ranks that failed."""

    def __init__(self, message: str, ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


def is_initialized() -> bool:
    """Whether torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that prints, shows progress bars and writes final outputs."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the torchrun (or SLURM-style) environment variables of a process group are set."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
"""The process-group backend for work on each device type: the one whose collectives take
tensors of that type (nccl's take CUDA tensors only)."""


def backend_for(device: torch.device | str | None, backend: str | None = None) -> str:
    """The process-group backend for models and tensors on ``device``.

    ``backend`` None: gloo for the CPU (and any device other than CUDA), nccl for CUDA; with
    ``device`` None as well, both (``"cpu:gloo,cuda:nccl"``, each collective then goes to the
    backend of its tensors' device) when CUDA is available, else gloo. An explicit ``backend``
    is returned as given unless it cannot carry ``device``'s tensors (nccl for a device other
    than CUDA): that is a ValueError naming the fix.
    """
    if device is None:
        if backend is not None:
            return backend
        return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    kind = torch.device(device).type
    if backend is None:
        return BACKENDS.get(kind, "gloo")
    if backend == "nccl" and kind != "cuda":
        raise ValueError(
            f"the nccl backend only carries CUDA tensors, but the work runs on {kind}; use "
            f"backend='gloo' for {kind} (or leave backend None to follow the device), or run "
            "on the GPUs (--device cuda on the command line)"
        )
    return backend


def init_from_env(
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    backend: str | None = None,
    device: torch.device | str | None = None,
) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    ``device`` is where this process's models and tensors live (the CLI's ``--device``); the
    backend follows it (:func:`backend_for`: gloo for ``cpu``, nccl for ``cuda``), and an
    explicit ``backend`` that cannot carry its tensors is refused. On CUDA the process's
    current GPU becomes ``device``'s index, or ``LOCAL_RANK`` for a plain ``cuda`` (so that
    ``cuda`` is each process's own GPU). ``device`` None keeps the device open: nccl and gloo
    side by side when CUDA is available (each process on GPU ``LOCAL_RANK``), gloo otherwise.
    Does nothing when a group already exists or the variables are not set. Returns True when
    this call created the group (the caller should destroy it with
    ``torch.distributed.destroy_process_group()``; :func:`process_group` does).
    """
    if is_initialized() or not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError(
            "torchrun's variables (RANK, WORLD_SIZE, ...) are set but this build of torch has no "
            "torch.distributed; install a torch with distributed support or run a single process"
        )
    chosen = backend_for(device, backend)
    if "nccl" in chosen or (device is not None and torch.device(device).type == "cuda"):
        torch.cuda.set_device(_own_gpu(device))
    dist.init_process_group(chosen, timeout=timeout)
    return True


def _own_gpu(device: torch.device | str | None) -> int:
    """The index of this process's GPU: ``device``'s own, else ``LOCAL_RANK`` (0 without it);
    a ValueError when this machine has no such GPU (before nccl fails less clearly)."""
    index = None if device is None else torch.device(device).index
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(
            "the work runs on CUDA (nccl) but this machine has no usable GPU; run on the CPU "
            "(--device cpu on the command line, device='cpu' in Python: gloo)"
        )
    if index >= count:
        raise ValueError(
            f"this process's GPU would be cuda:{index} (LOCAL_RANK "
            f"{os.environ.get('LOCAL_RANK', '0')}), but this machine has {count}; start at most "
            "one process per GPU (torchrun --nproc-per-node)"
        )
    return index


@contextlib.contextmanager
def process_group(
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    backend: str | None = None,
    device: torch.device | str | None = None,
) -> Iterator[None]:
    """Run the body inside the torchrun process group for work on ``device`` (its backend as
    :func:`init_from_env` chooses it), destroying
    the group afterwards if this call created it. An exception in the body is re-raised as a
    :class:`RankError` naming this rank (unless it already is one), so that torchrun's report
    says which rank failed. Without torchrun's variables the body runs as a single process."""
    created = init_from_env(timeout, backend, device)
    try:
        yield
        if created:
            # Every rank reaches the teardown together: a rank that tears its connections down
            # while another is still finishing a collective can abort that one (gloo).
            dist.barrier()
    except Exception as exc:
        if world_size() == 1 or isinstance(exc, RankError):
            raise
        message = f"{type(exc).__name__}: {exc}"
        others = _record_failure(message)
        if not others:
            raise RankError(f"rank {rank()} of {world_size()} failed: {message}", [rank()]) from exc
        first = min(others)
        raise RankError(
            f"rank {rank()} of {world_size()} stopped because rank {first} failed: "
            f"{others[first]} (on rank {rank()}: {message})",
            sorted(others),
        ) from exc
    finally:
        if created:
            dist.destroy_process_group()
            gc.collect()  # the group's worker threads stop now, not at interpreter shutdown


def _record_failure(message: str) -> dict[int, str]:
    """Leave this rank's failure in the process group's key-value store and return those the
    other ranks left there: a rank that stops because another one vanished (a collective ends
    with "connection reset by peer") can then name the rank that failed first. Best effort:
    the store may be gone with the process that hosted it."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"fisher_fast/failed/{rank()}", message)
        keys = {r: f"fisher_fast/failed/{r}" for r in range(world_size()) if r != rank()}
        return {r: store.get(k).decode() for r, k in keys.items() if store.check([k])}
    except Exception:
        return {}


def all_outcomes(what: str, compute: Callable[[], T]) -> list[T]:
    """Run ``compute()`` on this rank and return every rank's result, in rank order.

    Results travel as pickled objects (``all_gather_object``), so keep them small and on the
    CPU. Exceptions are exchanged too: when ``compute`` raises on any rank, every rank raises a
    :class:`RankError` naming ``what`` and the failing ranks with their messages (the failing
    rank chains its own exception), so no rank waits for a result that never comes. Without a
    process group this is ``[compute()]``.
    """
    if world_size() == 1:
        return [compute()]
    result: Any = None
    error: Exception | None = None
    try:
        result = compute()
    except Exception as exc:
        error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, (message, None if error else result))
    failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if failed:
        if len(failed) == 1:
            where, details = f"rank {failed[0][0]}", failed[0][1]
        else:
            where = f"ranks {', '.join(str(r) for r, _ in failed)}"
            details = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise RankError(
            f"{what} failed on {where} of {world_size()}: {details}", [r for r, _ in failed]
        ) from error
    return [value for _, value in gathered]


def on_main(what: str, compute: Callable[[], T]) -> T:
    """Run ``compute()`` on rank 0 only and return its result on every rank (pickled, so keep
    it small and on the CPU); an exception on rank 0 is raised on every rank as in
    :func:`all_outcomes`. Without a process group this is ``compute()``."""
    if world_size() == 1:
        return compute()
    return all_outcomes(what, lambda: compute() if is_main() else None)[0]  # type: ignore[return-value]


def shard_range(n: int, rank_: int | None = None, world_size_: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that rank ``rank_`` of ``world_size_`` owns
    (defaults: this process). Blocks differ in length by at most one and cover every index
    exactly once, without the padding of ``DistributedSampler``; some may be empty."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside 0..{w - 1}")
    return range(r * n // w, (r + 1) * n // w)


def shard(data: Any) -> Any:
    """This rank's contiguous share of ``data`` (see :func:`shard_range`), for diag_fim's
    ``distributed`` mode: a tensor (rows), a pair ``(X, y)`` (``y`` may be None) or a map-style
    Dataset (a Subset; wrap it in your DataLoader). Unlike ``DistributedSampler``, which pads
    the last shard with repeated samples when N is not a multiple of the world size, the shards
    add up to the data exactly once, so the reduced FIM equals the single-process one.
    """
    if isinstance(data, torch.Tensor):
        part = shard_range(data.shape[0])
        return data[part.start : part.stop]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"X has {x.shape[0]} samples but y has {y.shape[0]}")
        part = shard_range(x.shape[0])
        return x[part.start : part.stop], None if y is None else y[part.start : part.stop]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, shard_range(len(data)))
    raise TypeError(
        f"shard takes a tensor, a pair (X, y) of tensors or a map-style Dataset with a length, "
        f"got {type(data).__name__}"
    )
