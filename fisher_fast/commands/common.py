"""What several subcommands share: their common options, the library inputs those options name
(a suite, one of its tasks, training and FUSE settings), and running a command under torchrun.

Under torchrun every rank runs the whole command; :func:`in_process_group` shows the standard
output of rank 0 only, so the commands print with plain :func:`print`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fisher_fast.devices import parse_device
from fisher_fast.distributed import DEFAULT_TIMEOUT, is_main, process_group
from fisher_fast.mixed_precision import PRECISIONS
from fisher_fast.nas import FuseConfig
from fisher_fast.pipeline.main_job import MAIN_JOB_FUSE
from fisher_fast.tasks.loaders.config import load_task_config
from fisher_fast.tasks.suites import EMBEDDED, Suite, get_suite
from fisher_fast.tasks.train import TrainConfig

Command = Callable[[argparse.Namespace], int]
"""A subcommand's body: the parsed arguments in, the exit status out."""

DEFAULT_SUITE = "digits"
TRAINING_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "precision")
"""The :class:`~fisher_fast.tasks.train.TrainConfig` fields ``distance`` takes as options."""
FUSE_OPTIONS = ("rounds", "candidates", "max_steps", "precision")
"""The :class:`~fisher_fast.nas.FuseConfig` fields the searching commands take as options."""


def listing(names: Sequence[str], last: str = "and") -> str:
    """``names`` as prose: ``a, b and c`` (``last`` joins the final two)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def add_suite_arguments(
    parser: argparse._ActionsContainer, choices: Sequence[str], *, files: bool = True
) -> None:
    """``--suite NAME`` out of ``choices`` (default digits); with ``files`` also ``--config
    FILE`` (tasks of the user's own, replacing the suite) and ``--data PATH`` (the folder of a
    suite that is not embedded). Without ``files`` the choices must all be embedded suites."""
    if files:
        suite_help = f"built-in task suite (default {DEFAULT_SUITE})"
    else:
        suite_help = (
            f"embedded suite (no download): {listing(choices, 'or')} (default {DEFAULT_SUITE})"
        )
    parser.add_argument("--suite", choices=list(choices), default=DEFAULT_SUITE, help=suite_help)
    if not files:
        return
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="JSON file defining your own tasks (replaces --suite)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help=f"folder holding the suite's files (all suites but {listing(EMBEDDED)})",
    )


def chosen_suite(args: argparse.Namespace, **options: Any) -> Suite:
    """The suite of ``--config`` when given, else the built-in ``--suite`` read from ``--data``
    with the suite's own ``options`` (see :func:`~fisher_fast.tasks.suites.get_suite`)."""
    if args.config is not None:
        return load_task_config(args.config)
    return get_suite(args.suite, args.data, **options)


def pick_task(suite: Suite, ref: str) -> int:
    """Index of the task named or numbered ``ref`` (a ``TASK`` option)."""
    names = [t.name for t in suite.tasks]
    if ref in names:
        return names.index(ref)
    if ref.isdigit() and int(ref) < len(names):
        return int(ref)
    tasks = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    raise ValueError(f"no task {ref!r} in suite {suite.name} ({tasks})")


def add_device_argument(parser: argparse._ActionsContainer) -> None:
    """``--device``: where the command's models train and its FIMs are computed; checked by
    :func:`fisher_fast.devices.resolve_device` before any work, and under torchrun the process
    group's backend (:func:`in_process_group`)."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu, cuda or cuda:1 (default cpu); under torchrun the "
        "processes talk over gloo for cpu and nccl for cuda, where 'cuda' is each process's "
        "own GPU (LOCAL_RANK)",
    )


def add_threads_argument(parser: argparse._ActionsContainer) -> None:
    """``--threads N``: torch's CPU threads during the command (None: the library's default,
    see :mod:`fisher_fast.tasks.threads`)."""
    parser.add_argument(
        "--threads",
        metavar="N",
        type=int,
        help="CPU threads for torch (default: 1 for the small probes, which run faster "
        "single-threaded; torch's default otherwise)",
    )


def add_quiet_argument(parser: argparse._ActionsContainer) -> None:
    """``--quiet``: no progress bars (they go to stderr; the results still print)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_timeout_argument(parser: argparse._ActionsContainer, fits: str) -> None:
    """``--dist-timeout MIN``: how long a rank waits for the others under torchrun, read by
    :func:`in_process_group`; ``fits`` says what work must fit in it."""
    default = DEFAULT_TIMEOUT.total_seconds() / 60
    parser.add_argument(
        "--dist-timeout",
        metavar="MIN",
        type=float,
        default=default,
        help="under torchrun: minutes a process waits for the others at a synchronisation point "
        f"before giving up (default {default:.0f}); {fits}",
    )


def add_search_run_arguments(parser: argparse._ActionsContainer) -> None:
    """The run options of the commands that search cells (``dictionary build``, ``search``,
    ``demo``): ``--seed``, ``--threads``, ``--quiet``, ``--device`` and ``--dist-timeout``."""
    parser.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    add_threads_argument(parser)
    add_quiet_argument(parser)
    add_device_argument(parser)
    add_timeout_argument(
        parser, "the work between two synchronisations (e.g. a probe's training) must fit in it"
    )


def add_fuse_arguments(
    parser: argparse._ActionsContainer, *, defaults_from_dictionary: bool = False
) -> None:
    """``--rounds``, ``--candidates``, ``--max-steps`` and ``--precision`` of FUSE
    (:data:`FUSE_OPTIONS`), by default the main job's (or, with ``defaults_from_dictionary``,
    the dictionary's)."""

    def default(value: object) -> str:
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
    add_precision_argument(
        parser,
        "the searches' and the final training's steps (probes train as the suite or "
        f"dictionary says); default {default(MAIN_JOB_FUSE.precision)}",
    )


def add_precision_argument(parser: argparse._ActionsContainer, what: str) -> None:
    """``--precision``: automatic mixed precision of ``what`` (:mod:`fisher_fast.mixed_precision`)."""
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help=f"fp32, or bf16 / fp16 automatic mixed precision of {what}",
    )


def fuse_settings(args: argparse.Namespace, base: FuseConfig) -> FuseConfig:
    """``base`` with the FUSE options given on the command line."""
    return replace(base, **_given(args, FUSE_OPTIONS))


def training_settings(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """``defaults`` with the training options given on the command line (:data:`TRAINING_OPTIONS`)."""
    return replace(defaults, **_given(args, TRAINING_OPTIONS))


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options ``names`` that the command line set (those that are not None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def print_outcome(summary: str, files: str, start: float) -> None:
    """The last lines of a study's output: its ``summary`` (a table), the line saying where its
    ``files`` are, and the seconds since ``start`` (a :func:`time.perf_counter` reading)."""
    print(summary)
    print(files)
    print(f"done in {time.perf_counter() - start:.1f} s")


def in_process_group(run: Command) -> Command:
    """``run`` inside the torchrun process group when torchrun launched the command (the work is
    then shared by the processes; a lone process runs it all), with ``--dist-timeout`` as the
    group's timeout, the backend of ``--device`` (gloo for cpu, nccl for cuda, each process on
    its own GPU) and the standard output of rank 0 only."""

    def wrapped(args: argparse.Namespace) -> int:
        timeout = datetime.timedelta(minutes=args.dist_timeout)
        with process_group(timeout=timeout, device=parse_device(args.device, "--device")):
            if is_main():
                return run(args)
            with contextlib.redirect_stdout(io.StringIO()):
                return run(args)

    return wrapped
