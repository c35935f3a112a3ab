"""pytest-benchmark suite: the Fréchet distance kernel on the CPU against its two yardsticks.

The kernel (``fisher_fast.ops.frechet_sums``), the plain PyTorch expression of eq. 4 and
``torch.dot`` (the memory floor), on two 10^7-element float32 FIMs; and
``fisher_fast.frechet_distance`` on the same values as two DiagFIMs of 2,000 named parameters,
whose names and shapes it checks before the kernel (that check must stay small beside it). The workloads are those of
``distance_ratios.py``, which prints the ratios from one interleaved run for the README.

    pytest benchmarks/test_bench_distance.py --benchmark-only
"""

from __future__ import annotations

import distance_ratios as dr
import pytest
import torch

from fisher_fast import DiagFIM, frechet_distance

PARAMETERS = 2000


@pytest.fixture(scope="module")
def fims() -> tuple[torch.Tensor, torch.Tensor]:
    a, b = dr.make_fims(dr.N, 2)
    return a, b


@pytest.mark.parametrize("method", [dr.dot, dr.kernel, dr.expression], ids=lambda f: f.__name__)
def test_frechet_distance_cpu(benchmark, method, fims: tuple[torch.Tensor, torch.Tensor]) -> None:
    benchmark.group = f"Fréchet distance, {dr.N:,} float32, CPU"
    benchmark(method, *fims)


def test_frechet_distance_of_named_fims(benchmark, fims: tuple[torch.Tensor, torch.Tensor]) -> None:
    names = [f"layer{i}.weight" for i in range(PARAMETERS)]
    shapes = [(dr.N // PARAMETERS,)] * PARAMETERS
    a, b = (DiagFIM(f, list(names), shapes, n_samples=1, fisher="empirical") for f in fims)
    benchmark.group = f"Fréchet distance, {dr.N:,} float32, CPU"
    benchmark(frechet_distance, a, b)
