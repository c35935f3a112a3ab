"""``fisher-fast distance``: the task distance matrix of a suite from the command line."""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fisher_fast.devices import resolve_device
from fisher_fast.distributed import DEFAULT_TIMEOUT, is_main, process_group, world_size
from fisher_fast.tasks.dense.report import format_dense
from fisher_fast.tasks.dense.study import dense_study
from fisher_fast.tasks.dense.suite import DENSE_SUITES
from fisher_fast.tasks.distances import distance_matrix
from fisher_fast.tasks.loaders.config import load_task_config
from fisher_fast.tasks.matrix import LABEL_CONVENTIONS
from fisher_fast.tasks.probes import PROBES
from fisher_fast.tasks.report import format_matrix
from fisher_fast.tasks.suites import SUITES, Suite, get_suite
from fisher_fast.tasks.train import OPTIMIZERS, TrainConfig

DESCRIPTION = """\
Trains one ε-approximation probe per task and seed (paper Definition 2), computes every probe's
diagonal Fisher information on every task's test split with diag_fim, and prints the Fréchet task
distance matrix d[source, target] (Definition 4) as mean ± standard deviation over the seeds.
Results go to OUT/results-<fisher>.json and OUT/distance-<fisher>.png; trained probes and FIMs are
cached in OUT, so a rerun (or a resumed, interrupted run) recomputes nothing already done.
Suites: digits and mnist5k (embedded, no download), mnist (IDX files), cifar10 and cifar100 (python pickle
batches), imagenet-folder (class-per-folder image tree); or --config FILE for tasks of your own.
Nothing is downloaded: the other suites read the files under --data.

mnist5k-dense is the image-to-image study of §4.4 (embedded): eight tasks computed from each
MNIST image (autoencoding, denoising, edges, keypoints, blur, deblur, inpainting, curvature),
an autoencoder probe trained with the mean-square error, the regression Fisher, and a
transfer-learning affinity (fine-tuning each task's probe on every other task) with the rank
correlation between the two; results in OUT/dense-<fisher>.json and .png."""


def add_distance_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``distance`` subcommand on the CLI's subparsers."""
    p = sub.add_parser(
        "distance",
        help="task distance matrix of a suite (paper §3.1, §4): probes, FIMs, mean/std over seeds",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("tasks")
    what.add_argument(
        "--suite",
        choices=[*SUITES, *DENSE_SUITES],
        default="digits",
        help="built-in task suite (default digits)",
    )
    what.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="JSON file defining your own tasks (replaces --suite)",
    )
    what.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="folder holding the suite's files (all suites but digits and mnist5k)",
    )
    what.add_argument(
        "--class-map",
        type=Path,
        metavar="FILE",
        help="imagenet-folder: JSON {class name: folder name}; default PATH/class_map.json if it "
        "exists, else the built-in ILSVRC-2012 synset folders",
    )
    what.add_argument(
        "--images-per-class",
        metavar="N",
        type=int,
        default=1000,
        help="imagenet-folder: images drawn per class (default 1000)",
    )
    what.add_argument(
        "--train-per-class",
        metavar="N",
        type=int,
        default=800,
        help="imagenet-folder: of which for training (default 800)",
    )
    what.add_argument(
        "--image-size",
        metavar="PX",
        type=int,
        default=32,
        help="imagenet-folder: side of the resized images in pixels (default 32)",
    )
    probe = p.add_argument_group("probes")
    probe.add_argument(
        "--arch",
        choices=list(PROBES),
        help="probe architecture (default: the suite's, mlp for digits; mnist5k-dense has "
        "its own autoencoder probe)",
    )
    probe.add_argument(
        "--seeds",
        metavar="N",
        type=int,
        default=5,
        help="number of trials, seeds 0..N-1 (default 5)",
    )
    probe.add_argument(
        "--epsilon",
        metavar="EPS",
        type=float,
        help="warn when a probe's test accuracy is below 1 - ε (default: the suite's)",
    )
    probe.add_argument(
        "--epochs", metavar="N", type=int, help="training epochs (default: the suite's)"
    )
    probe.add_argument(
        "--batch-size", metavar="N", type=int, help="training batch size (default: the suite's)"
    )
    probe.add_argument("--lr", type=float, help="learning rate (default: the suite's)")
    probe.add_argument(
        "--weight-decay", metavar="WD", type=float, help="weight decay (default: the suite's)"
    )
    probe.add_argument(
        "--optimizer", choices=list(OPTIMIZERS), help="optimizer (default: the suite's, adam)"
    )
    fim = p.add_argument_group("distances")
    fim.add_argument(
        "--fisher",
        choices=list(LABEL_CONVENTIONS),
        help="Fisher kind (default exact; empirical for mnist5k-dense, where exact costs one "
        "backward pass per pixel). exact / mc: the source probe's own predictive "
        "distribution; empirical: the source probe scored on the target task's labels",
    )
    fim.add_argument(
        "--mc-samples",
        metavar="K",
        type=int,
        default=1,
        help="labels drawn per sample for --fisher mc (default 1)",
    )
    fim.add_argument(
        "--fim-batch-size",
        metavar="N",
        type=int,
        default=256,
        help="samples per FIM batch (default 256)",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--out", type=Path, metavar="DIR", help="run directory (default runs/<suite>-<arch>)"
    )
    add_device_argument(run)
    run.add_argument(
        "--threads",
        metavar="N",
        type=int,
        help="CPU threads for torch (default: 1 for the small probes, which run faster "
        "single-threaded; torch's default otherwise)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results of other settings in --out (without it such a rerun is refused "
        "before any work; a rerun with the same settings reuses every cached probe and FIM)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_timeout_argument(run, "one trial's probe trainings on one process must fit in it")
    p.set_defaults(run=run_distance, resumable=True)


def run_distance(args: argparse.Namespace) -> int:
    """Run ``fisher-fast distance``: build the suite, compute the matrix, print it. Under
    torchrun (``torchrun --nproc-per-node N -m fisher_fast.cli distance ...``) the processes
    form a process group (gloo on CPU, nccl with CUDA) and share the work; rank 0 prints."""
    with process_group(timeout=datetime.timedelta(minutes=args.dist_timeout)):
        return _run_distance(args)


def _run_distance(args: argparse.Namespace) -> int:
    if args.config is None and args.suite in DENSE_SUITES:
        return _run_dense(args)
    args.fisher = args.fisher or "exact"
    start = time.perf_counter()
    say = print if is_main() else _silent
    suite = _suite(args)
    arch = args.arch or suite.default_arch
    out = args.out = args.out or Path("runs") / f"{suite.name}-{arch}"
    resolve_device(args.device, "--device")
    say(
        f"suite {suite.name}: "
        + "; ".join(f"{i}: {t.name} ({t.num_classes} classes)" for i, t in enumerate(suite.tasks))
    )
    say(
        f"probe {arch}, head width {suite.head_width} (task label k -> head unit k); {LABEL_CONVENTIONS[args.fisher]}"
    )
    if world_size() > 1:
        say(f"{world_size()} processes share the work ({dist.get_backend()} backend)")
    result = distance_matrix(
        suite,
        arch,
        seeds=args.seeds,
        fisher=args.fisher,
        mc_samples=args.mc_samples,
        epsilon=args.epsilon,
        train=_training(args, suite.train),
        out=out,
        device=args.device,
        batch_size=args.fim_batch_size,
        progress=not args.quiet,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    say(format_matrix(result))
    say(
        f"results: {out / f'results-{args.fisher}.json'}, figure: {out / f'distance-{args.fisher}.png'}"
    )
    say(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _run_dense(args: argparse.Namespace) -> int:
    """The §4.4 study of an image-to-image suite (one process: it is small enough)."""
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
        train=_training(args, suite.train),
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
    print(format_dense(result))
    print(
        f"results: {out / f'dense-{fisher}.json'}, figures: {out / f'dense-{fisher}.png'}, {out / f'dense-{fisher}-ranks.png'}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _training(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """``defaults`` with the training settings given on the command line."""
    names = ("epochs", "batch_size", "lr", "weight_decay", "optimizer")
    given: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return replace(defaults, **given)


def _silent(*_: object) -> None:
    """print on the ranks other than 0."""


def add_device_argument(parser: argparse._ActionsContainer) -> None:
    """``--device``: where the command's models train and its FIMs are computed; checked by
    :func:`fisher_fast.devices.resolve_device` before any work."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu, cuda or cuda:1 (default cpu); under torchrun with CUDA, "
        "'cuda' is each process's own GPU (LOCAL_RANK)",
    )


def add_timeout_argument(parser: argparse._ActionsContainer, fits: str) -> None:
    """``--dist-timeout MIN``: how long a rank waits for the others under torchrun; ``fits``
    says what work must fit in it."""
    default = DEFAULT_TIMEOUT.total_seconds() / 60
    parser.add_argument(
        "--dist-timeout",
        metavar="MIN",
        type=float,
        default=default,
        help="under torchrun: minutes a process waits for the others at a synchronisation point "
        f"before giving up (default {default:.0f}); {fits}",
    )


def _suite(args: argparse.Namespace) -> Suite:
    if args.config is not None:
        return load_task_config(args.config)
    if args.suite != "imagenet-folder":
        return get_suite(args.suite, args.data)
    return get_suite(
        args.suite,
        args.data,
        class_map=args.class_map,
        images_per_class=args.images_per_class,
        train_per_class=args.train_per_class,
        image_size=args.image_size,
    )
