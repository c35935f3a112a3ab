"""Command line: ``fisher-fast info``, ``demo`` and ``distance`` (also ``python -m fisher_fast.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from fisher_fast.tasks.cli import add_distance_parser


def _info(_: argparse.Namespace) -> int:
    import fisher_fast

    print(json.dumps(fisher_fast.build_info(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fisher_fast.demo import run_demo

    start = time.perf_counter()
    run_demo(seed=args.seed, epochs=args.epochs, progress=not args.quiet)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisher-fast",
        description="Diagonal Fisher information, Fréchet task distance and task-aware NAS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="print what this build contains (versions, kernels, threads)"
    )
    info.set_defaults(run=_info)
    demo = sub.add_parser(
        "demo",
        help="train small probes on the embedded 8x8 digits and print their task distances",
        description=(
            "Trains one small MLP per digits task (scikit-learn's embedded 8x8 digits; no download), "
            "computes each network's diagonal Fisher on every task's test split with diag_fim, and "
            "prints the Fréchet task distance matrix d[source, target] (paper Definition 4)."
        ),
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the probes' initialisation and batch order (default 0)",
    )
    demo.add_argument(
        "--epochs", type=int, help="training epochs per probe (default: the digits suite's, 40)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    add_distance_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
