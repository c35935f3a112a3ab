"""Command line: ``fisher-fast info``, ``distance``, ``dictionary``, ``search`` and ``demo`` (the
main job); also ``python -m fisher_fast.cli``."""

from __future__ import annotations

import argparse
import json
import sys

from fisher_fast.pipeline.cli import add_pipeline_parsers
from fisher_fast.tasks.cli import add_distance_parser


def _info(_: argparse.Namespace) -> int:
    import fisher_fast

    print(json.dumps(fisher_fast.build_info(), indent=2))
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
    add_distance_parser(sub)
    add_pipeline_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
