"""Sums of rows by key: the same bits on every run, and no host sync on an accelerator.

``add_rows(out, keys, values)`` is ``out[k] += sum of the rows of values with key k``. On the
CPU, ``index_add_`` adds row after row in order (deterministic) and is 3-10x faster than
sorting, so it is kept there. On CUDA it adds with float atomics (rows that share a key are
summed in the order the threads arrive, so the last bits change from run to run), and the usual
remedy, ``unique`` keys and a reduction per key, makes the host wait for the device to learn how
many keys there are. So off the CPU every tensor keeps a size fixed by the number of rows M:

* the keys are sorted (stably) and split into runs of equal keys (``runs``): run j starts at
  ``offsets[j]``; the number of runs stays on the device, and runs past it are empty;
* ``sum_runs`` reduces each run in order (``segment_reduce``, one sequential sum per run; on the
  CPU ``index_add_``, faster there): M rows, zero past the last run;
* ``scatter_runs`` adds run j's row to ``out[key of run j]``; the runs' keys are distinct, and the
  zero rows past them go to spread rows, so ``index_put_(accumulate=True)`` (on CUDA: indices
  sorted, each destination summed in order by one thread, no atomics) adds one term per row plus
  zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def adds_with_atomics(device: torch.device) -> bool:
    """Whether ``index_add_`` on ``device`` sums repeated keys in an arbitrary order."""
    return device.type != "cpu"


@dataclass(frozen=True)
class Runs:
    """The runs of equal keys of M sorted keys, in tensors of fixed size (M > 0).

    ``run_of`` (M,): the run of each sorted key; ``offsets`` (M + 1,): where run j starts, for j
    below ``count``, and M past it (so runs past the last are empty); ``keys`` (M,): run j's key,
    the largest key past the last run; ``count``: the number of runs, a 0-dim int64 tensor on
    the keys' device (never read here).
    """

    run_of: torch.Tensor
    offsets: torch.Tensor
    keys: torch.Tensor
    count: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """(M,) the number of keys in run j (0 past the last run)."""
        return self.offsets.diff()


def runs(sorted_keys: torch.Tensor) -> Runs:
    """The runs of ``sorted_keys`` (M,), nondecreasing, M > 0, without reading any value."""
    m = sorted_keys.numel()
    new = sorted_keys[1:] != sorted_keys[:-1]
    run_of = torch.cat([new.new_zeros(1, dtype=torch.int64), new.cumsum(0)])  # (M,) run of each
    starts = torch.arange(m + 1, device=sorted_keys.device)
    offsets = torch.searchsorted(run_of, starts)  # first position of run j, M past the last
    keys = sorted_keys[offsets[:-1].clamp(max=m - 1)]
    return Runs(run_of, offsets, keys, run_of[-1] + 1)


def sum_runs(sorted_values: torch.Tensor, found: Runs) -> torch.Tensor:
    """(M, D): row j the sum of the rows of ``sorted_values`` (M, D) in run j, added in order;
    zero past the last run."""
    if not adds_with_atomics(sorted_values.device):
        return torch.zeros_like(sorted_values).index_add_(0, found.run_of, sorted_values)
    return torch.segment_reduce(sorted_values, "sum", offsets=found.offsets, axis=0, unsafe=True)


def scatter_runs(out: torch.Tensor, found: Runs, sums: torch.Tensor) -> None:
    """In place: ``out[found.keys[j]] += sums[j]`` for every run j (keys in [0, K), out (K, D),
    sums (M, D) of out's dtype with zero rows past the last run), in a fixed order."""
    slot = torch.arange(sums.shape[0], device=sums.device)
    # Past the last run the rows are zero: spread them over out instead of onto one key.
    dest = torch.where(slot < found.count, found.keys, slot % out.shape[0])
    if adds_with_atomics(out.device):
        out.index_put_((dest,), sums, accumulate=True)
    else:
        out.index_add_(0, dest, sums)


def add_rows(out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """In place: ``out[keys[m]] += values[m]`` for every m, in a fixed order.

    out: (K, D), keys: (M,) int64 in [0, K), values: (M, D) of out's dtype and device.
    """
    if not adds_with_atomics(out.device) or keys.numel() == 0:
        out.index_add_(0, keys, values)
        return
    order = torch.argsort(keys, stable=True)
    found = runs(keys[order])
    scatter_runs(out, found, sum_runs(values[order], found))
