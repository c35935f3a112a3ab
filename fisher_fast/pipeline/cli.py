"""``fisher-fast dictionary build|list``, ``fisher-fast search`` and ``fisher-fast demo`` (the
main job): Algorithm 1 from the command line. ``build``, ``search`` and ``demo`` also run under
``torchrun --nproc-per-node N -m fisher_fast.cli ...`` (data-parallel searches, output on rank 0)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fisher_fast.devices import resolve_device
from fisher_fast.distributed import is_main, process_group
from fisher_fast.nas import FuseConfig
from fisher_fast.pipeline.algorithm import (
    DECIDING_KIND_REASON,
    DEFAULT_FINAL_STEPS,
    candidate_baselines,
    search_architecture,
)
from fisher_fast.pipeline.dictionary import DictionarySettings, TaskDictionary, build_dictionary
from fisher_fast.pipeline.main_job import MAIN_JOB_FUSE, run_main_job
from fisher_fast.tasks.cli import add_device_argument, add_timeout_argument
from fisher_fast.tasks.probes import CIFAR_PROBES, PROBES, SMALL_PROBES
from fisher_fast.tasks.suites import EMBEDDED, SUITES, Suite, get_suite
from fisher_fast.tasks.task import Task


def add_pipeline_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``dictionary``, ``search`` and ``demo`` on the CLI's subparsers."""
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
    _suite_arguments(build)
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
    _search_arguments(build)
    build.set_defaults(run=_in_process_group(_build), resumable=True)
    listing = actions.add_parser("list", help="print the baselines of a dictionary")
    listing.add_argument("dictionary", type=Path, metavar="DIR")
    listing.set_defaults(run=_list)

    search = sub.add_parser(
        "search",
        help="Algorithm 1 for a target task: closest baseline, its restricted space, FUSE",
        description="Trains the target's probe, measures the Fréchet distance from every "
        "baseline of the dictionary, restricts the space to the closest baseline's best cell, "
        "searches it with FUSE, trains the found cell and tests it once. The FUSE rounds are "
        "checkpointed in --out: rerunning an interrupted search resumes it.",
    )
    _suite_arguments(search)
    search.add_argument("--target", required=True, metavar="TASK", help="task index or name")
    search.add_argument("--dictionary", type=Path, required=True, metavar="DIR")
    search.add_argument(
        "--out", type=Path, metavar="DIR", help="run folder (default runs/search-<suite>-<target>)"
    )
    search.add_argument(
        "--final-steps",
        type=int,
        default=DEFAULT_FINAL_STEPS,
        metavar="N",
        help=f"training steps of the found cell (default {DEFAULT_FINAL_STEPS})",
    )
    _search_arguments(search, defaults_from_dictionary=True)
    search.set_defaults(run=_in_process_group(_search), resumable=True)

    demo = sub.add_parser(
        "demo",
        help="the main job: Algorithm 1 on the embedded digits, reported as the paper's Table 1",
        description="Builds (or reuses) the dictionary of digits tasks 0, 1 and 3, finds the "
        "closest to task 2, searches its restricted space with FUSE, and compares the found "
        "cell with random search (same space, same budget), FUSE in the full space and the "
        "hand-designed probes. Writes main-job.json and main-job.png into --out.",
    )
    demo.add_argument(
        "--suite",
        choices=EMBEDDED,
        default="digits",
        help="embedded suite: digits (8x8, default) or mnist5k (5,000 real 28x28 MNIST images)",
    )
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
    _common_arguments(demo)
    demo.set_defaults(run=_in_process_group(_demo), resumable=True)


def _suite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=list(SUITES), default="digits", help="task suite")
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="the suite's files (all suites but digits and mnist5k)",
    )


def _search_arguments(
    parser: argparse.ArgumentParser, *, defaults_from_dictionary: bool = False
) -> None:
    def default(value: int) -> str:
        return "the dictionary's setting" if defaults_from_dictionary else str(value)

    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help=f"FUSE rounds (default {default(MAIN_JOB_FUSE.rounds)})",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        metavar="C",
        help="cells sampled per FUSE round besides the incumbent "
        f"(default {default(MAIN_JOB_FUSE.candidates)})",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help=f"cap on the steps of one FUSE round (default {default(MAIN_JOB_FUSE.max_steps)})",
    )
    _common_arguments(parser)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_argument(parser)
    add_timeout_argument(
        parser, "the work between two synchronisations (e.g. a probe's training) must fit in it"
    )


def _in_process_group(
    run: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """``run`` inside the torchrun process group when launched by torchrun (the searches then
    train data-parallel), printing on rank 0 only."""

    def wrapped(args: argparse.Namespace) -> int:
        with process_group(timeout=datetime.timedelta(minutes=args.dist_timeout)):
            if is_main():
                return run(args)
            with contextlib.redirect_stdout(io.StringIO()):
                return run(args)

    return wrapped


def _fuse(args: argparse.Namespace, base: FuseConfig) -> FuseConfig:
    names = ("rounds", "candidates", "max_steps")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return replace(base, **changes)


def _pick(suite: Suite, ref: str) -> int:
    """Index of the task named or numbered ``ref``."""
    names = [t.name for t in suite.tasks]
    if ref in names:
        return names.index(ref)
    if ref.isdigit() and int(ref) < len(names):
        return int(ref)
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    raise ValueError(f"no task {ref!r} in suite {suite.name} ({listing})")


def _build(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = resolve_device(args.device, "--device")
    suite = get_suite(args.suite, args.data)
    excluded = {_pick(suite, ref) for ref in args.exclude}
    tasks = [t for i, t in enumerate(suite.tasks) if i not in excluded]
    settings = DictionarySettings.for_suite(suite, tasks[0], _fuse(args, MAIN_JOB_FUSE), args.nodes)
    if args.epochs is not None:
        settings = replace(settings, train=replace(suite.train, epochs=args.epochs))
    replace_names = [suite.tasks[_pick(suite, ref)].name for ref in args.replace]
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


def _list(args: argparse.Namespace) -> int:
    _print_baselines(TaskDictionary.open(args.dictionary))
    return 0


def _print_baselines(dictionary: TaskDictionary) -> None:
    s = dictionary.settings
    print(f"{len(dictionary)} baselines; probe {s.arch}, {s.nodes}-node cells, Fisher {s.fisher}")
    for b in dictionary:
        print(f"  {b.task}: {b.genotype}  (probe test accuracy {b.probe['test_accuracy']:.3f})")


def _search(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, "--device")
    suite = get_suite(args.suite, args.data)
    target: Task = suite.tasks[_pick(suite, args.target)]
    dictionary = TaskDictionary.open(args.dictionary)
    if target.name in dictionary:
        candidate_baselines(target, dictionary)  # refuses when nothing else is left
        print(
            f"note: the target {target.name!r} is itself a baseline of {args.dictionary}; it is "
            "left out of the candidates for a*"
        )
    out = args.out = args.out or Path("runs") / f"search-{suite.name}-{args.target}"
    report = search_architecture(
        target,
        dictionary,
        seed=args.seed,
        config=_fuse(args, dictionary.settings.fuse),
        final_steps=args.final_steps,
        out=out,
        progress=not args.quiet,
        threads=args.threads,
        device=device,
    )
    for name, d in sorted(report.distances.items(), key=lambda kv: kv[1]):
        print(f"d({name} -> {target.name}) = {d:.4f}{'  <- a*' if name == report.closest else ''}")
    for kind, d_kind in report.distances_by_kind.items():
        if kind != report.fisher:
            name = report.closest_by_kind[kind]
            print(f"under the {kind} Fisher (for comparison): a* = {name}, d = {d_kind[name]:.4f}")
    print(
        f"the {report.fisher} Fisher decides (the dictionary's setting): "
        f"{DECIDING_KIND_REASON[report.fisher]}"
    )
    print(
        f"restricted space: {report.space_size} cells of {report.full_space_size} "
        f"(best cell of {report.closest!r}: {report.baseline_genotype})"
    )
    e = report.evaluation
    print(
        f"found {report.search.genotype} in {len(report.search.history)} rounds, "
        f"{report.seconds:.1f} s; test accuracy {e.test_accuracy:.4f}, {e.parameters} parameters"
    )
    print(f"report: {out / 'report.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = resolve_device(args.device, "--device")
    suite = get_suite(args.suite)
    target = _pick(suite, args.target)
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
    print(result.format())
    print(f"report: {result.json_path}, figure: {result.figure_path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
