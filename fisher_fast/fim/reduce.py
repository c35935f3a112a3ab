"""diag_fim over a torch.distributed process group: sum the ranks' accumulators.

Each rank accumulates ``sum_n (dL_n/dθ)^2`` over its own shard of the data; the accumulators
(float32 or float64 sums) and the sample counts are then summed over the ranks, so every rank
divides the same totals and returns the same FIM. It equals the single-process FIM over the
union of the shards up to the rounding of a different summation order. A rank whose shard is
empty contributes zeros; only when every shard is empty is the data empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from fisher_fast import distributed as dist_env


class LocalSums(NamedTuple):
    """What one process accumulated before the division by the number of samples."""

    names: list[str]
    """The parameters covered, in the flat buffer's order."""
    acc: torch.Tensor
    """(P,) sum over this process's samples of the squared per-sample gradients, flat."""
    n_samples: int


def should_reduce(distributed: bool | None) -> bool:
    """diag_fim's ``distributed`` argument resolved: None reduces when a process group with
    more than one rank is initialised, True requires one, False never reduces."""
    if distributed is None:
        return dist_env.world_size() > 1
    if distributed and not dist_env.is_initialized():
        raise ValueError(
            "diag_fim(distributed=True) needs an initialised torch.distributed process group; "
            "launch with torchrun and call fisher_fast.distributed.init_from_env() (or "
            "torch.distributed.init_process_group(..., timeout=...)) first, or pass distributed=None"
        )
    return bool(distributed)


def reduce_sums(
    compute: Callable[[], LocalSums | None],
    sizes: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
) -> LocalSums:
    """Run ``compute()`` (this rank's sums, None for an empty shard) and sum over the ranks.

    ``sizes`` maps every trainable parameter name to its number of elements, so that a rank
    with an empty shard can contribute zeros of the right length. Raises on every rank, naming
    the failing ranks, when ``compute`` raised on any of them, and ValueError when all shards
    are empty or the ranks covered different parameters.
    """
    mine: list[LocalSums | None] = [None]

    def summary() -> tuple[list[str], int]:
        mine[0] = compute()
        return ([], 0) if mine[0] is None else (mine[0].names, mine[0].n_samples)

    layouts = dist_env.all_outcomes("diag_fim", summary)
    total = sum(n for _, n in layouts)
    if total == 0:
        raise ValueError(
            f"data is empty on all {len(layouts)} ranks: no rank yielded a sample; check the "
            "sharding (each rank passes its own part of the data)"
        )
    names = {tuple(ns) for ns, n in layouts if n > 0}
    if len(names) > 1:
        raise ValueError(
            "the ranks computed the FIM over different parameters; pass the same model, "
            "requires_grad flags and on_unsupported on every rank"
        )
    order = list(names.pop())
    local = mine[0]
    if local is None:
        acc = torch.zeros(sum(sizes[n] for n in order), dtype=dtype, device=device)
    else:
        acc = local.acc
    if dist.get_backend() == "nccl" and acc.device.type != "cuda":
        raise ValueError(
            f"the process group uses nccl, which reduces CUDA tensors only, but the model is on "
            f"{acc.device}; move the model and data to cuda:LOCAL_RANK or initialise the group "
            "with the gloo backend"
        )
    dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    return LocalSums(order, acc, total)
