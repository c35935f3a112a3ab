"""Command line: ``fisher-fast info``, ``distance``, ``dictionary``, ``search`` and ``demo`` (the
main job); also ``python -m fisher_fast.cli``. This module assembles the parser from the
subcommands of :mod:`fisher_fast.commands` (one module each) and runs the chosen one.

Expected errors (bad input, missing or damaged files, a device this machine lacks, see
:data:`EXPECTED_ERRORS`) print one ``error: ...`` line to stderr and exit with status 2, as
argparse does for bad arguments; Ctrl-C prints one line and exits with 130. Anything else is a
bug and keeps its traceback. ``FISHER_FAST_TRACEBACK=1`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fisher_fast._version import __version__
from fisher_fast.commands import demo, dictionary, distance, info, search
from fisher_fast.distributed import RankError
from fisher_fast.extras import MissingDependencyError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # bad input; also DictionaryError, DiagFIMFileError and json's decode error
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    RankError,  # an expected error on another rank of a torchrun job, already named there
    MissingDependencyError,  # an optional package the command needs, with its install command
)
"""What the command line reports in one line; every other exception is a bug."""
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


COMMANDS = (info, distance, dictionary, search, demo)
"""The subcommand modules, in the order ``--help`` lists them; each has ``add_parser(sub)``."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; a parsed command's ``run`` runs it (see :func:`main`)."""
    parser = argparse.ArgumentParser(
        prog="fisher-fast",
        description="Diagonal Fisher information, Fréchet task distance and task-aware NAS.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fisher-fast {__version__} (torch {torch.__version__})",
        help="print the fisher_fast and torch versions and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module doc)."""
    args = build_parser().parse_args(argv)
    show_traceback = os.environ.get("FISHER_FAST_TRACEBACK", "") not in ("", "0")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        if show_traceback:
            raise
        print(_interrupted(args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as error:
        if show_traceback:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by "; ")."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _interrupted(args: argparse.Namespace) -> str:
    """What to tell after Ctrl-C: where the finished work is, when the command keeps it."""
    out = getattr(args, "out", None)
    if out is None or not getattr(args, "resumable", False):
        return "interrupted"
    return f"interrupted; finished work is saved in {out}, rerun the same command to resume"


if __name__ == "__main__":
    sys.exit(main())
