"""``fisher-fast search``: Algorithm 1 for one target task against a task dictionary
(:func:`fisher_fast.pipeline.algorithm.search_architecture`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fisher_fast.commands import common
from fisher_fast.devices import resolve_device
from fisher_fast.pipeline.algorithm import (
    DECIDING_KIND_REASON,
    DEFAULT_FINAL_STEPS,
    candidate_baselines,
    search_architecture,
)
from fisher_fast.pipeline.dictionary import TaskDictionary
from fisher_fast.tasks.suites import SUITES

DESCRIPTION = (
    "Trains the target's probe, measures the Fréchet distance from every baseline of the "
    "dictionary, restricts the space to the closest baseline's best cell, searches it with FUSE, "
    "trains the found cell and tests it once. The FUSE rounds are checkpointed in --out: "
    "rerunning an interrupted search resumes it."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``search`` on the CLI's subparsers."""
    help = "Algorithm 1 for a target task: closest baseline, its restricted space, FUSE"
    search = sub.add_parser("search", help=help, description=DESCRIPTION)
    common.add_suite_arguments(search, list(SUITES))
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
    common.add_fuse_arguments(search, defaults_from_dictionary=True)
    common.add_search_run_arguments(search)
    search.set_defaults(run=common.in_process_group(run_search), resumable=True)


def run_search(args: argparse.Namespace) -> int:
    """Search the architecture of ``--target`` and print the distances, a* and the found cell."""
    device = resolve_device(args.device, "--device")
    suite = common.chosen_suite(args)
    target = suite.tasks[common.pick_task(suite, args.target)]
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
        config=common.fuse_settings(args, dictionary.settings.fuse),
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
