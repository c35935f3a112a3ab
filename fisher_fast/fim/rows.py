"""``out[k] += sum of the rows of values with key k``, with the same bits on every run.

On CUDA, ``index_add_`` adds with float atomics, so rows that share a key are summed in the
order the threads happen to arrive and the result changes in its last bits from run to run.
There the keys are sorted (stably) and each run of equal keys is reduced in order
(``segment_reduce``), then written to distinct rows. On the CPU ``index_add_`` adds row after
row in order (deterministic) and is 3-10x faster than sorting, so it is kept there.
"""

from __future__ import annotations

import torch


def adds_with_atomics(device: torch.device) -> bool:
    """Whether ``index_add_`` on ``device`` sums repeated keys in an arbitrary order."""
    return device.type != "cpu"


def add_rows(out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """In place: ``out[keys[m]] += values[m]`` for every m, in a fixed order.

    out: (K, D), keys: (M,) int64 in [0, K), values: (M, D) of out's dtype and device.
    """
    if not adds_with_atomics(out.device) or keys.numel() == 0:
        out.index_add_(0, keys, values)
        return
    order = torch.argsort(keys, stable=True)
    unique, counts = torch.unique_consecutive(keys[order], return_counts=True)
    out[unique] += torch.segment_reduce(values[order], "sum", lengths=counts, axis=0)
