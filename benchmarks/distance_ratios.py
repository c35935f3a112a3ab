"""Fréchet distance on the CPU: the kernel against a dot product and the plain PyTorch expression.

Times, in one run and interleaved (every repeat times each method once, in a shuffled order, so
that all of them see the same machine load), the median of many calls after a warm-up, for two diagonal FIMs
of N float32 elements:

* ``dot``: ``torch.dot(a, b)``, the memory floor: it reads the same bytes and does one FMA each;
* ``kernel``: the compiled op ``fisher_fast.ops.frechet_sums``, one pass and three float64 sums;
* ``frechet_distance``: the public function, the kernel plus input checks and the final formula;
* ``expression``: ``((a/a.sum()).sqrt() - (b/b.sum()).sqrt()).norm() / sqrt(2)``, written plainly;
* one reference against K others: ``frechet_distances(ref, [F1..FK])`` against K single calls.

Targets (benchmarks/README.md): kernel within 1.5x of the dot, at least 25x faster than the
expression. Prints a markdown table for benchmarks/README.md.

    python benchmarks/distance_ratios.py [--n 10000000] [--repeats 50] [--k 4]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import torch

import fisher_fast
from fisher_fast import ops

N = 10**7  # elements per FIM
REPEATS = 50  # timed calls per method
WARMUP = 5  # untimed calls per method first
K = 4  # others in the one-to-many comparison


def make_fims(n: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` positive float32 diagonals of ``n`` elements, heavy-tailed like real FIMs."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).mul_(2.0).exp_() for _ in range(count)]


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b)


def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ops.frechet_sums([a], [b])


def expression(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a / a.sum()).sqrt() - (b / b.sum()).sqrt()).norm() / math.sqrt(2.0)


def median_times(
    methods: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each method: every round calls each method once, in an order
    shuffled per round (seeded), so that no method always follows the same one (the caches and
    clock state a call leaves behind favour or hurt the next), after ``warmup`` calls each."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    order = random.Random(0)
    names = list(methods)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            fn = methods[name]
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N, help="elements per FIM")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per method")
    parser.add_argument("--k", type=int, default=K, help="others in the one-to-many comparison")
    args = parser.parse_args()

    ref, *others = make_fims(args.n, 1 + args.k)
    a, b = ref, others[0]
    d_kernel = fisher_fast.frechet_distance(a, b).item()
    d_plain = expression(a.double(), b.double()).item()
    assert abs(d_kernel - d_plain) < 1e-12, (d_kernel, d_plain)  # time only correct answers

    t = median_times(
        {
            "dot": lambda: dot(a, b),
            "kernel": lambda: kernel(a, b),
            "frechet_distance": lambda: fisher_fast.frechet_distance(a, b),
            "expression": lambda: expression(a, b),
            "one_to_many": lambda: fisher_fast.frechet_distances(ref, others),
            "single_calls": lambda: [fisher_fast.frechet_distance(ref, o) for o in others],
        },
        args.repeats,
        WARMUP,
    )

    print(f"N = {args.n:,} float32, {torch.get_num_threads()} threads, torch {torch.__version__}, ")
    print(f"median of {args.repeats} interleaved calls after {WARMUP} warm-up calls each\n")
    print("| method | median time (ms) | ratio |")
    print("| --- | ---: | --- |")
    print(f"| `torch.dot(a, b)` | {t['dot'] * 1e3:.3f} | 1 (floor) |")
    print(
        f"| kernel `ops.frechet_sums` | {t['kernel'] * 1e3:.3f} "
        f"| {t['kernel'] / t['dot']:.2f}x the dot |"
    )
    print(
        f"| `fisher_fast.frechet_distance` | {t['frechet_distance'] * 1e3:.3f} "
        f"| {t['frechet_distance'] / t['dot']:.2f}x the dot |"
    )
    print(
        f"| plain PyTorch expression | {t['expression'] * 1e3:.3f} "
        f"| kernel {t['expression'] / t['kernel']:.1f}x faster |"
    )
    print(
        f"| `frechet_distances(ref, [F1..F{args.k}])` | {t['one_to_many'] * 1e3:.3f} "
        f"| {t['single_calls'] / t['one_to_many']:.2f}x faster than {args.k} single calls |"
    )
    print(f"| {args.k} x `frechet_distance(ref, Fk)` | {t['single_calls'] * 1e3:.3f} | |")


if __name__ == "__main__":
    main()
