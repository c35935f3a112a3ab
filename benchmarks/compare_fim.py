"""Time and peak memory of every diagonal-Fisher method on every benchmark model, as one table.

Each (model, method) cell runs in a fresh subprocess (this script with ``--worker``), so that one
method's allocator state, thread pools, hooks or crash cannot affect another. In the worker:
``torch.set_num_threads(--threads)``, build the seeded problem, call the method once to warm up,
time ``--repeats`` calls and keep the median, then measure the peak memory of one more call.
A cell that raises, hits an unsupported layer or exceeds ``--timeout`` seconds is reported as
``fails (<short reason>)``; a method whose library is missing as ``n/a``.

Peak memory is resident memory (RSS), because torch's CPU tensors live in C++ allocations that
``tracemalloc`` never sees, and ``resource.getrusage`` ``ru_maxrss`` only ever grows, so it would
report the peak of model creation or warm-up instead. The worker therefore (1) runs the garbage
collector and ``malloc_trim(0)``, so that memory freed by earlier calls but kept by glibc is
returned and the baseline is the memory really in use (model, data, libraries); (2) reads that
baseline as ``VmRSS``; (3) writes ``5`` to ``/proc/self/clear_refs``, which resets the ``VmHWM``
high-water mark to the current RSS (Linux ≥ 4.0); (4) runs the method once; (5) reports
``VmHWM − baseline``: the extra memory the method needed at its peak, result included.

The table has one row per model and one column per method. The ``floor`` column (one forward and
one backward pass of the mean loss, the cost floor of any method) shows absolute time and peak
memory; every other cell shows ``time ratio over floor (peak memory ratio over floor)``.

    python benchmarks/compare_fim.py --out runs/fim_compare.json
    python benchmarks/compare_fim.py --quick --models mlp cnn --methods floor vmap_grad
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fim_baselines import METHODS, NotAvailable, Unsupported
from fim_models import PROBLEMS, QUICK_N, make_problem

DEFAULT_REPEATS = 3
DEFAULT_THREADS = 2
DEFAULT_TIMEOUT_S = 600.0
QUICK_REPEATS = 1
REASON_CHARS = 70  # failure reasons are cut to this length in the table

Cell = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Worker: one (model, method) cell in this process
# ---------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Collect garbage and hand glibc's cached free pages back to the OS (no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_bytes(run: Any) -> int | None:
    """Extra resident memory at the peak of ``run()``; None where VmHWM cannot be reset."""
    _release_freed_memory()
    baseline = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    result = run()
    peak = _proc_status_kib("VmHWM")
    del result
    return max(0, peak - baseline) * 1024


def _short_reason(err: BaseException) -> str:
    """One line, table-safe: the message of our own errors, else ``Type: first line``."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(err, Unsupported | NotAvailable):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    text = text.replace("|", "/")
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def measure_cell(model_name: str, method: str, repeats: int, threads: int, quick: bool) -> Cell:
    """Warm up, time ``repeats`` calls (median) and measure the peak memory of one more call."""
    torch.set_num_threads(threads)
    problem = make_problem(model_name, n=QUICK_N, small=True) if quick else make_problem(model_name)
    fn = METHODS[method].fn
    cell: Cell = {
        "n": len(problem.inputs),
        "kind": METHODS[method].kind,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews times
    }
    try:
        fn(*problem)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*problem)
            times.append(time.perf_counter() - start)
        peak = peak_memory_bytes(lambda: fn(*problem))
    except NotAvailable as err:
        return {**cell, "status": "n/a", "reason": _short_reason(err)}
    except Exception as err:
        return {**cell, "status": "fails", "reason": _short_reason(err)}
    return {
        **cell,
        "status": "ok",
        "seconds": statistics.median(times),
        "times": times,
        "peak_bytes": peak,
    }


# ---------------------------------------------------------------------------------------------
# Driver: one subprocess per cell
# ---------------------------------------------------------------------------------------------
def run_cell(model_name: str, method: str, args: argparse.Namespace) -> Cell:
    """Run one cell in a fresh interpreter and return what its worker printed (last line)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        model_name,
        method,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if args.quick:
        command.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "fails", "reason": f"timeout > {args.timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"status": "fails", "reason": _crash_reason(done)}


def _crash_reason(done: subprocess.CompletedProcess[str]) -> str:
    """Why a worker died without printing a result: its signal or last stderr line."""
    if done.returncode < 0:
        return f"killed by signal {-done.returncode}"
    errors = done.stderr.strip().splitlines()
    return (errors[-1] if errors else f"exit code {done.returncode}")[:REASON_CHARS]


def run_all(args: argparse.Namespace) -> dict[str, dict[str, Cell]]:
    """Every (model, method) cell, printing progress to stderr."""
    results: dict[str, dict[str, Cell]] = {}
    for model_name in args.models:
        results[model_name] = {}
        for method in args.methods:
            start = time.perf_counter()
            cell = run_cell(model_name, method, args)
            results[model_name][method] = cell
            print(
                f"{model_name:12s} {method:28s} {cell['status']:5s} "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _format_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` with two significant digits below 10 (``0.05×``, ``2.3×``, ``31×``)."""
    if value is None or not reference:
        return "?"
    ratio = value / reference
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.2g}×"


def format_cell(cell: Cell, floor: Cell | None) -> str:
    """``time× (memory×)`` over the floor cell; absolute values for the floor itself."""
    if cell["status"] == "n/a":
        return "n/a"
    if cell["status"] != "ok":
        return f"fails ({cell['reason']})"
    peak = cell.get("peak_bytes")
    if floor is None or cell is floor:
        memory = _format_bytes(peak) if peak is not None else "memory ?"
        return f"{cell['seconds']:.3g} s ({memory})"
    if floor["status"] != "ok":
        return f"{cell['seconds']:.3g} s (floor failed)"
    return f"{_ratio(cell['seconds'], floor['seconds'])} ({_ratio(peak, floor.get('peak_bytes'))})"


def markdown_table(results: dict[str, dict[str, Cell]], methods: list[str]) -> str:
    """Rows: models (with N); columns: methods (with the Fisher kind they compute)."""
    header = ["model"] + [f"{m} [{METHODS[m].kind}]" for m in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model_name, row in results.items():
        floor = row.get("floor")
        n = next((cell["n"] for cell in row.values() if "n" in cell), "?")
        cells = [format_cell(row[m], floor) for m in methods]
        lines.append("| " + " | ".join([f"{model_name} (N={n})", *cells]) + " |")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "processor": platform.processor() or platform.machine(),
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int, help=f"timed calls (default {DEFAULT_REPEATS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="s per cell")
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_N}, small inputs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if "floor" not in args.methods:  # every ratio is over the floor
        args.methods.insert(0, "floor")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_cell(*args.worker, args.repeats, args.threads, args.quick)))
        return
    results = run_all(args)
    print(markdown_table(results, args.methods))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
        report = {"config": config, "machine": _machine(), "results": results}
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
