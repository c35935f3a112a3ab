"""diag_fim of the benchmark CNN: one process against two processes joined by torch.distributed.

Three set-ups, each in freshly spawned processes (torch.multiprocessing), on the same seeded
problem (``fim_models.cnn_problem``, N samples):

* ``1 process x 1 thread``: the whole batch, ``torch.set_num_threads(1)``;
* ``1 process x 2 threads``: the whole batch, 2 intra-op threads;
* ``2 processes x 1 thread``: a gloo process group on loopback; each rank passes its half
  (``fisher_fast.shard``) and diag_fim all-reduces the sums.

Each set-up warms up with one call, then times ``--repeats`` calls and keeps the median; the
three set-ups run ``--rounds`` times, interleaved, and the table gives the median and range over
rounds (on a shared machine a burst of load then shows as a wide range instead of a skewed
result). In the 2-process set-up every call starts after a barrier and its time is the slower
rank's, the wall-clock time a user waits; the same processes also time diag_fim on their shard
alone (``distributed=False``), so the difference is the cost of the reduction. Process start-up
is reported apart (paid once per job, not per call). The script also checks that the 2-process FIM equals the
single-process one up to float32 rounding.

    python benchmarks/distributed_fim.py            # N=256, 5 repeats, 3 rounds
    python benchmarks/distributed_fim.py --n 64 --repeats 1 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fim_models import CNN_N, cnn_problem

import fisher_fast

TIMEOUT = datetime.timedelta(minutes=5)
SETUPS = (
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread", 2, 1),
)


def worker(
    rank: int, world_size: int, threads: int, n: int, repeats: int, port: int, out: str
) -> None:
    """One process of a set-up: time ``repeats`` diag_fim calls and, with several processes,
    as many calls on the local shard alone (``distributed=False``); save the times and the FIM."""
    torch.set_num_threads(threads)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
    model, inputs, targets = cnn_problem(n)
    data = fisher_fast.shard((inputs, targets)) if world_size > 1 else (inputs, targets)
    loop_start = time.perf_counter()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats + 1):  # the first call warms up
        for reduce in (True, False) if world_size > 1 else (True,):
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            fim = fisher_fast.diag_fim(
                model, data, progress=False, distributed=None if reduce else False
            )
            if i > 0:
                times[reduce].append(time.perf_counter() - start)
            if reduce:
                flat = fim.flat
    result = {"times": times, "loop_s": time.perf_counter() - loop_start, "flat": flat}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


def run_setup(world_size: int, threads: int, n: int, repeats: int) -> dict[str, Any]:
    """Spawn the processes of one set-up. Returns the median time per call (the slowest rank's),
    the median time of the local shard alone (``local_s``, several processes only), the rest of
    the job's wall time (starting Python and torch, the process group, the data, exiting) and
    rank 0's FIM."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        mp.spawn(
            worker, args=(world_size, threads, n, repeats, _free_port(), out), nprocs=world_size
        )
        total_s = time.perf_counter() - start
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world_size)]

    def slowest(reduce: bool) -> float:
        return statistics.median(max(r["times"][reduce][i] for r in ranks) for i in range(repeats))

    return {
        "median_s": slowest(True),
        "local_s": slowest(False) if world_size > 1 else None,
        "startup_s": total_s - max(r["loop_s"] for r in ranks),
        "flat": ranks[0]["flat"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=CNN_N, help=f"samples (default {CNN_N})")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per set-up and round (default 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over the three set-ups (default 3)"
    )
    args = parser.parse_args(argv)
    print(
        f"diag_fim, benchmark CNN, N={args.n}, median of {args.repeats}; {_cpu_model()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
        f"kernels loaded: {fisher_fast.is_loaded()}"
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in SETUPS}
    for _ in range(args.rounds):  # interleaved, so that a burst of load hits every set-up
        for name, w, t in SETUPS:
            runs[name].append(run_setup(w, t, args.n, args.repeats))
    base = statistics.median(r["median_s"] for r in runs[SETUPS[0][0]])
    print(
        "| set-up | time per call, median (min–max) over rounds | speed-up over 1×1 "
        "| local shard alone | start-up + exit |"
    )
    print("|---|---|---|---|---|")
    for name, rounds in runs.items():
        times = [r["median_s"] for r in rounds]
        local = [r["local_s"] for r in rounds if r["local_s"] is not None]
        print(
            f"| {name} | {statistics.median(times):.3f} s ({min(times):.3f}–{max(times):.3f}) "
            f"| {base / statistics.median(times):.2f}× "
            f"| {f'{statistics.median(local):.3f} s' if local else '–'} "
            f"| {statistics.median(r['startup_s'] for r in rounds):.1f} s |"
        )
    one, two = runs[SETUPS[0][0]][0]["flat"], runs[SETUPS[2][0]][0]["flat"]
    torch.testing.assert_close(two, one, rtol=1e-5, atol=0)
    print("2-process FIM equals the 1-process FIM (float32 rounding, rtol 1e-5)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
