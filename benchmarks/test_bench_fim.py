"""pytest-benchmark suite: the diagonal Fisher of each benchmark model by fisher_fast and peers.

Benchmarks the cost floor (one forward and backward pass), fisher_fast (torch and kernels
backends) and the peer libraries on the models of `fim_models`, grouped by model. Methods whose
library is missing, or that cannot handle a model, are skipped with the reason; correctness is
the job of ``test_fim_baselines.py``. ``compare_fim.py`` gives the same comparison in isolated
processes with peak memory; this suite is for tracking times with pytest-benchmark.

    pytest benchmarks/test_bench_fim.py --benchmark-only
    FIM_BENCH_QUICK=1 pytest benchmarks/test_bench_fim.py --benchmark-only   # smoke run
"""

from __future__ import annotations

import os

import fim_baselines as fb
import pytest
from fim_models import PROBLEMS, QUICK_N, Problem, make_problem

ROUNDS = 3  # timed calls per benchmark, after one warm-up call
QUICK = os.environ.get("FIM_BENCH_QUICK", "") not in ("", "0")
BENCHMARKED = [
    "floor",
    "fisher_fast_torch",
    "fisher_fast_kernels",
    "backpack_sum_grad_squared",
    "opacus_grad_sample",
    "nngeometry_diag_empirical",
    "nngeometry_diag",
    "backpack_diag_ggn_exact",
    "fisher_fast_torch_exact",
    "fisher_fast_kernels_exact",
]

_problems: dict[str, Problem] = {}


def _problem(name: str) -> Problem:
    """Each problem is built once per session (``FIM_BENCH_QUICK``: few samples, small inputs)."""
    if name not in _problems:
        _problems[name] = make_problem(name, n=QUICK_N, small=True) if QUICK else make_problem(name)
    return _problems[name]


@pytest.mark.parametrize("model_name", list(PROBLEMS))
@pytest.mark.parametrize("method", BENCHMARKED)
def test_diag_fim(benchmark, method: str, model_name: str) -> None:
    spec = fb.METHODS[method]
    problem = _problem(model_name)
    try:
        spec.fn(*problem)  # also the warm-up
    except fb.NotAvailable as err:
        pytest.skip(str(err))
    except Exception as err:
        pytest.skip(f"{method} fails on {model_name}: {err}")
    benchmark.group = f"{model_name} (N={len(problem.inputs)})"
    benchmark.extra_info["fisher"] = spec.kind
    benchmark.pedantic(spec.fn, args=tuple(problem), rounds=ROUNDS, iterations=1)
