"""Time ratios of diagonal-Fisher methods over the floor, measured interleaved in one process.

``compare_fim.py`` isolates every (model, method) cell in its own process, which is right for
peak memory but lets a busy minute land on one cell and not another: on a shared machine a
10 ms floor measured in one process and a method measured in the next can move the ratio by
±30%. Here every round calls each method once, in turn, on the same problem (each method on its
own deep copy of the model, since some peers modify modules), after one warm-up call each; the
medians over rounds are compared. Time only (no memory); wall clock (``time.perf_counter``).

    python benchmarks/interleaved_fim.py --model mlp --rounds 40
    python benchmarks/interleaved_fim.py --model cnn --methods floor fisher_fast_kernels vmap_grad
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from fim_baselines import METHODS
from fim_models import PROBLEMS

DEFAULT_METHODS = [
    "floor",
    "fisher_fast_kernels",
    "fisher_fast_torch",
    "backpack_sum_grad_squared",
    "nngeometry_diag_empirical",
    "vmap_grad",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(PROBLEMS), default="mlp")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if "floor" not in args.methods:
        parser.error("--methods must include floor (the ratios are over it)")
    torch.set_num_threads(args.threads)
    problem = PROBLEMS[args.model]()
    models = {name: copy.deepcopy(problem.model) for name in args.methods}
    for name in args.methods:  # warm-up
        METHODS[name].fn(models[name], problem.inputs, problem.targets)
    times: dict[str, list[float]] = {name: [] for name in args.methods}
    for _ in range(args.rounds):
        for name in args.methods:
            start = time.perf_counter()
            METHODS[name].fn(models[name], problem.inputs, problem.targets)
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"])
    print(f"{args.model}, {args.threads} threads, {args.rounds} interleaved rounds, medians")
    for name in args.methods:
        median = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        print(
            f"  {name:28s} {median * 1e3:9.2f} ms  {median / floor:6.2f}x the floor"
            f"  (quartiles {q1 / floor:.2f}-{q3 / floor:.2f}x)"
        )


if __name__ == "__main__":
    main()
