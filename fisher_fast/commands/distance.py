"""``fisher-fast distance``: the task distance matrix of a suite from the command line; the
image-to-image suites of §4.4 go to :mod:`fisher_fast.commands.dense`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fisher_fast.commands import common
from fisher_fast.commands.dense import run_dense
from fisher_fast.devices import resolve_device
from fisher_fast.distributed import world_size
from fisher_fast.tasks.dense.suite import DENSE_SUITES
from fisher_fast.tasks.distance_study import distance_matrix
from fisher_fast.tasks.fisher_kinds import LABEL_CONVENTIONS
from fisher_fast.tasks.probes import PROBES
from fisher_fast.tasks.report import format_matrix
from fisher_fast.tasks.suites import EMBEDDED, SUITES
from fisher_fast.tasks.train import OPTIMIZERS

DESCRIPTION = f"""\
Trains one ε-approximation probe per task and seed (paper Definition 2), computes every probe's
diagonal Fisher information on every task's test split with diag_fim, and prints the Fréchet task
distance matrix d[source, target] (Definition 4) as mean ± standard deviation over the seeds.
Results go to OUT/results-<fisher>.json and OUT/distance-<fisher>.png; trained probes and FIMs are
cached in OUT, so a rerun (or a resumed, interrupted run) recomputes nothing already done.
Suites: {common.listing(EMBEDDED)} (embedded, no download), mnist (IDX files), cifar10 and
cifar100 (python pickle batches), imagenet-folder (class-per-folder image tree); or --config FILE
for tasks of your own. Nothing is downloaded: the other suites read the files under --data.

mnist5k-dense is the image-to-image study of §4.4 (embedded): eight tasks computed from each
MNIST image (autoencoding, denoising, edges, keypoints, blur, deblur, inpainting, curvature),
an autoencoder probe trained with the mean-square error, the regression Fisher, and a
transfer-learning affinity (fine-tuning each task's probe on every other task) with the rank
correlation between the two; results in OUT/dense-<fisher>.json and .png."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``distance`` on the CLI's subparsers."""
    p = sub.add_parser(
        "distance",
        help="task distance matrix of a suite (paper §3.1, §4): probes, FIMs, mean/std over seeds",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("tasks")
    common.add_suite_arguments(what, [*SUITES, *DENSE_SUITES])
    what.add_argument(
        "--class-map",
        type=Path,
        metavar="FILE",
        help="imagenet-folder: JSON {class name: folder name}; default PATH/class_map.json if it "
        "exists, else the built-in ILSVRC-2012 synset folders",
    )
    _count_option(what, "--images-per-class", 1000, "imagenet-folder: images drawn per class")
    _count_option(what, "--train-per-class", 800, "imagenet-folder: of which for training")
    _count_option(
        what,
        "--image-size",
        32,
        "imagenet-folder: side of the resized images in pixels",
        metavar="PX",
    )
    probe = p.add_argument_group("probes")
    probe.add_argument(
        "--arch",
        choices=list(PROBES),
        help="probe architecture (default: the suite's, mlp for digits; mnist5k-dense has "
        "its own autoencoder probe)",
    )
    _count_option(probe, "--seeds", 5, "number of trials, seeds 0..N-1")
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
    common.add_precision_argument(probe, "the probes' training steps (default: the suite's, fp32)")
    fim = p.add_argument_group("distances")
    fim.add_argument(
        "--fisher",
        choices=list(LABEL_CONVENTIONS),
        help="Fisher kind (default exact; empirical for mnist5k-dense, where exact costs one "
        "backward pass per pixel). exact / mc: the source probe's own predictive "
        "distribution; empirical: the source probe scored on the target task's labels",
    )
    _count_option(fim, "--mc-samples", 1, "labels drawn per sample for --fisher mc", metavar="K")
    _count_option(fim, "--fim-batch-size", 256, "samples per FIM batch")
    run = p.add_argument_group("run")
    run.add_argument(
        "--out", type=Path, metavar="DIR", help="run directory (default runs/<suite>-<arch>)"
    )
    common.add_device_argument(run)
    common.add_threads_argument(run)
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results of other settings in --out (without it such a rerun is refused "
        "before any work; a rerun with the same settings reuses every cached probe and FIM)",
    )
    common.add_quiet_argument(run)
    common.add_timeout_argument(run, "one trial's probe trainings on one process must fit in it")
    p.set_defaults(run=common.in_process_group(run_distance), resumable=True)


def run_distance(args: argparse.Namespace) -> int:
    """Run ``fisher-fast distance``: build the suite, compute the matrix, print it. Under
    torchrun (``torchrun --nproc-per-node N -m fisher_fast.cli distance ...``) the processes
    share the work (see :func:`~fisher_fast.commands.common.in_process_group`)."""
    if args.config is None and args.suite in DENSE_SUITES:
        return run_dense(args)
    args.fisher = args.fisher or "exact"
    start = time.perf_counter()
    suite = common.chosen_suite(args, **_suite_options(args))
    arch = args.arch or suite.default_arch
    out = args.out = args.out or Path("runs") / f"{suite.name}-{arch}"
    resolve_device(args.device, "--device")
    print(
        f"suite {suite.name}: "
        + "; ".join(f"{i}: {t.name} ({t.num_classes} classes)" for i, t in enumerate(suite.tasks))
    )
    print(
        f"probe {arch}, head width {suite.head_width} (task label k -> head unit k); {LABEL_CONVENTIONS[args.fisher]}"
    )
    if world_size() > 1:
        print(f"{world_size()} processes share the work ({dist.get_backend()} backend)")
    result = distance_matrix(
        suite,
        arch,
        seeds=args.seeds,
        fisher=args.fisher,
        mc_samples=args.mc_samples,
        epsilon=args.epsilon,
        train=common.training_settings(args, suite.train),
        out=out,
        device=args.device,
        batch_size=args.fim_batch_size,
        progress=not args.quiet,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    files = f"results: {out / f'results-{args.fisher}.json'}, figure: {out / f'distance-{args.fisher}.png'}"
    common.print_outcome(format_matrix(result), files, start)
    return 0


def _suite_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the imagenet-folder suite, which only that suite takes."""
    if args.config is not None or args.suite != "imagenet-folder":
        return {}
    return {
        "class_map": args.class_map,
        "images_per_class": args.images_per_class,
        "train_per_class": args.train_per_class,
        "image_size": args.image_size,
    }


def _count_option(
    group: argparse._ActionsContainer, flag: str, default: int, text: str, metavar: str = "N"
) -> None:
    """An integer option whose help is ``text`` followed by its ``default``."""
    group.add_argument(
        flag, metavar=metavar, type=int, default=default, help=f"{text} (default {default})"
    )
