"""``fisher-fast info``: what this build contains, as JSON (see :func:`fisher_fast.build_info`)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``info`` on the CLI's subparsers."""
    info = sub.add_parser(
        "info", help="print what this build contains (versions, kernels, threads)"
    )
    info.set_defaults(run=run_info)


def run_info(_: argparse.Namespace) -> int:
    """Print :func:`fisher_fast.build_info` (imported here: it loads the compiled ops)."""
    import fisher_fast

    print(json.dumps(fisher_fast.build_info(), indent=2))
    return 0
