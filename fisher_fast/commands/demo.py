"""``fisher-fast demo``: the main job, Algorithm 1 on an embedded suite reported as the paper's
Table 1 (:func:`fisher_fast.pipeline.main_job.run_main_job`).

It takes the embedded suites only, no ``--config`` or ``--data``: it reproduces the paper's
experiment on data that ship with the package. For tasks of your own, ``dictionary build
--config`` and ``search --config`` run the same algorithm step by step."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fisher_fast.commands import common
from fisher_fast.devices import resolve_device
from fisher_fast.pipeline.main_job import run_main_job
from fisher_fast.tasks.probes import CIFAR_PROBES, PROBES, SMALL_PROBES
from fisher_fast.tasks.suites import EMBEDDED, get_suite

DESCRIPTION = (
    "Builds (or reuses) the dictionary of digits tasks 0, 1 and 3, finds the closest to task 2, "
    "searches its restricted space with FUSE, and compares the found cell with random search "
    "(same space, same budget), FUSE in the full space and the hand-designed probes. Writes "
    "main-job.json and main-job.png into --out."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` on the CLI's subparsers."""
    help = "the main job: Algorithm 1 on the embedded digits, reported as the paper's Table 1"
    demo = sub.add_parser("demo", help=help, description=DESCRIPTION)
    common.add_suite_arguments(demo, EMBEDDED, files=False)
    demo.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run directory (default runs/demo for digits, runs/demo-<suite> otherwise)",
    )
    demo.add_argument("--target", default="2", metavar="TASK", help="target task (default 2)")
    demo.add_argument(
        "--hand-designed",
        nargs="+",
        choices=list(PROBES),
        default=list(SMALL_PROBES),
        metavar="ARCH",
        help="hand-designed networks trained on the target for the table (default: "
        f"{' '.join(SMALL_PROBES)}; the paper's {' '.join(CIFAR_PROBES)} are also accepted, "
        "and take minutes each on a CPU: on mnist5k, one thread, 7 (VGG-16), 11 (ResNet-18) and "
        "31 (DenseNet-121) minutes of training steps)",
    )
    common.add_search_run_arguments(demo)
    demo.set_defaults(run=common.in_process_group(run_demo), resumable=True)


def run_demo(args: argparse.Namespace) -> int:
    """Run the main job for ``--target`` of the embedded ``--suite`` and print its table."""
    start = time.perf_counter()
    device = resolve_device(args.device, "--device")
    suite = get_suite(args.suite)
    target = common.pick_task(suite, args.target)
    args.out = args.out or Path("runs", "demo" if args.suite == "digits" else f"demo-{args.suite}")
    print(
        f"Algorithm 1 on the embedded {args.suite}: target task {target} "
        f"({suite.tasks[target].name}); baselines: the other tasks"
    )
    result = run_main_job(
        suite,
        target,
        args.out,
        seed=args.seed,
        progress=not args.quiet,
        threads=args.threads,
        hand_designed=args.hand_designed,
        device=device,
    )
    files = f"report: {result.json_path}, figure: {result.figure_path}"
    common.print_outcome(result.format(), files, start)
    return 0
