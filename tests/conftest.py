"""Shared test helpers: fresh random generators, random FIMs, float64 references, the cuda marker.

Every test draws fresh random data. The seed is printed (pytest shows it with a failure) and
``FISHER_FAST_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator

import pytest
import torch

import fisher_fast


def cuda_available() -> bool:
    """True when a GPU is usable and this build of fisher_fast has its CUDA kernels."""
    return (
        torch.cuda.is_available()
        and fisher_fast.is_loaded()
        and fisher_fast.build_info()["cuda_kernels"]
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` where there is no GPU or no compiled CUDA kernels."""
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and fisher_fast built with its CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each op test runs on the CPU and, marked ``cuda``, on the GPU."""
    return request.param


@pytest.fixture
def rule_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules a test registers live in a copy of the registry, dropped when the test ends."""
    from fisher_fast.fim import rules

    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))
    monkeypatch.setattr(rules, "_MATCHED", list(rules._MATCHED))


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fresh seed, printed so that a failure can be replayed."""
    seed = int(os.environ.get("FISHER_FAST_TEST_SEED", secrets.randbits(62)))
    print(f"random seed {seed}; replay with FISHER_FAST_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def random_fim(
    n: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    zeros: float = 0.0,
) -> torch.Tensor:
    """A positive diagonal with the heavy tail of real FIMs: log-normal, exp(2z) with z standard
    normal, cut at |z| = 5 so that every value (5e-5..2e4) is finite in float16 too.

    ``zeros`` is the fraction of entries set exactly to zero.
    """
    fim = torch.randn(n, generator=gen, dtype=torch.float64).clamp_(-5.0, 5.0).mul_(2.0).exp_()
    if zeros:
        fim[torch.rand(n, generator=gen) < zeros] = 0.0
    return fim.to(dtype=dtype, device=device)


def reference_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Paper eq. 4 computed plainly in float64: unit trace, then ||sqrt(a) - sqrt(b)|| / sqrt(2).

    Free of the cancellation of the three-sum form, so it is accurate for tiny distances too. The
    norm is taken as sqrt(sum of squares): torch.sum adds in a cascade (error ~1e-16 at 10^7
    elements) where torch.linalg.norm has been measured 1e-14 off.
    """
    a = a.detach().cpu().reshape(-1).double()
    b = b.detach().cpu().reshape(-1).double()
    a = a / a.sum()
    b = b / b.sum()
    return math.sqrt((a.sqrt() - b.sqrt()).square().sum().item() / 2)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: the tensors of the task, search and multi-process tests are
    tiny, and on a shared machine extra intra-op threads only contend (they made those tests tens
    of times slower); spawned ranks run one thread too, so references then use the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
