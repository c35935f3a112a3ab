"""``fisher-fast distance --suite mnist5k-dense``: the image-to-image study of §4.4 (task
distances against a transfer affinity), the ``distance`` command's branch for
:data:`~fisher_fast.tasks.dense.suite.DENSE_SUITES`."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from fisher_fast.commands import common
from fisher_fast.devices import resolve_device
from fisher_fast.distributed import world_size
from fisher_fast.tasks.dense.report import format_dense
from fisher_fast.tasks.dense.study import dense_study
from fisher_fast.tasks.dense.suite import DENSE_SUITES


def run_dense(args: argparse.Namespace) -> int:
    """Run the study of ``--suite`` and print it; one process only (it is small enough), and
    the options of the classification suites that do not apply here are refused."""
    start = time.perf_counter()
    if world_size() > 1:
        raise ValueError(f"--suite {args.suite} runs in one process; start it without torchrun")
    unused = [f"--{name.replace('_', '-')}" for name in ("arch", "data") if getattr(args, name)]
    if unused:
        raise ValueError(
            f"--suite {args.suite} takes no {' or '.join(unused)} (it is embedded, with its own probe)"
        )
    suite = DENSE_SUITES[args.suite]()
    suite = replace(  # replace re-runs the suite's checks on the command line's values
        suite,
        train=common.training_settings(args, suite.train),
        epsilon=suite.epsilon if args.epsilon is None else args.epsilon,
    )
    fisher = args.fisher or "empirical"
    out = args.out = args.out or Path("runs") / suite.name
    resolve_device(args.device, "--device")
    print(
        f"suite {suite.name}: "
        + "; ".join(f"{i}: {t.name} ({t.description})" for i, t in enumerate(suite.tasks))
    )
    result = dense_study(
        suite,
        seeds=args.seeds,
        fisher=fisher,
        mc_samples=args.mc_samples,
        out=out,
        device=args.device,
        batch_size=args.fim_batch_size,
        progress=not args.quiet,
        threads=1 if args.threads is None else args.threads,
        overwrite=args.overwrite,
    )
    files = f"results: {out / f'dense-{fisher}.json'}, figures: {out / f'dense-{fisher}.png'}, {out / f'dense-{fisher}-ranks.png'}"
    common.print_outcome(format_dense(result), files, start)
    return 0
