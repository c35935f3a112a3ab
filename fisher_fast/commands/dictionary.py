"""``fisher-fast dictionary build|list``: the task dictionary of Algorithm 1, its baselines'
probes and best cells (:mod:`fisher_fast.pipeline.dictionary`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from fisher_fast.commands import common
from fisher_fast.devices import resolve_device
from fisher_fast.pipeline.dictionary import DictionarySettings, TaskDictionary, build_dictionary
from fisher_fast.pipeline.main_job import MAIN_JOB_FUSE
from fisher_fast.tasks.suites import SUITES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dictionary`` and its actions ``build`` and ``list`` on the CLI's subparsers."""
    dictionary = sub.add_parser(
        "dictionary",
        help="the task dictionary of Algorithm 1: baseline tasks with their probes and best cells",
    )
    actions = dictionary.add_subparsers(dest="action", required=True)
    build = actions.add_parser(
        "build",
        help="train each baseline's probe and search its best cell with FUSE in the full space",
        description="Creates (or completes, after an interruption) a task dictionary: for every "
        "task of the suite except --exclude, an ε-approximation probe and the best cell found "
        "by FUSE in the full space of cells. Tasks already in the dictionary are kept.",
    )
    common.add_suite_arguments(build, list(SUITES))
    build.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="TASK",
        help="task index or name to leave out (the future target); repeatable",
    )
    build.add_argument("--out", type=Path, required=True, metavar="DIR", help="dictionary folder")
    build.add_argument("--nodes", type=int, default=4, choices=(3, 4), help="nodes per cell (4)")
    build.add_argument(
        "--epochs", type=int, metavar="N", help="probe training epochs (default: the suite's)"
    )
    build.add_argument(
        "--replace",
        action="append",
        default=[],
        metavar="TASK",
        help="task index or name whose baseline is trained and searched again and replaced "
        "(e.g. one whose probe file is damaged); repeatable",
    )
    common.add_fuse_arguments(build)
    common.add_search_run_arguments(build)
    build.set_defaults(run=common.in_process_group(run_build), resumable=True)
    listing = actions.add_parser("list", help="print the baselines of a dictionary")
    listing.add_argument("dictionary", type=Path, metavar="DIR")
    listing.set_defaults(run=run_list)


def run_build(args: argparse.Namespace) -> int:
    """Build (or complete) the dictionary ``--out`` from the suite's tasks but ``--exclude``."""
    start = time.perf_counter()
    device = resolve_device(args.device, "--device")
    suite = common.chosen_suite(args)
    excluded = {common.pick_task(suite, ref) for ref in args.exclude}
    tasks = [t for i, t in enumerate(suite.tasks) if i not in excluded]
    settings = DictionarySettings.for_suite(
        suite, tasks[0], common.fuse_settings(args, MAIN_JOB_FUSE), args.nodes
    )
    if args.epochs is not None:
        settings = replace(settings, train=replace(suite.train, epochs=args.epochs))
    replace_names = [suite.tasks[common.pick_task(suite, ref)].name for ref in args.replace]
    dictionary = build_dictionary(
        args.out,
        tasks,
        settings,
        seed=args.seed,
        progress=not args.quiet,
        replace=replace_names,
        threads=args.threads,
        device=device,
    )
    _print_baselines(dictionary)
    print(f"dictionary {args.out} ready in {time.perf_counter() - start:.1f} s")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print the baselines of the dictionary ``DIR``."""
    _print_baselines(TaskDictionary.open(args.dictionary))
    return 0


def _print_baselines(dictionary: TaskDictionary) -> None:
    s = dictionary.settings
    print(f"{len(dictionary)} baselines; probe {s.arch}, {s.nodes}-node cells, Fisher {s.fisher}")
    for b in dictionary:
        print(f"  {b.task}: {b.genotype}  (probe test accuracy {b.probe['test_accuracy']:.3f})")
