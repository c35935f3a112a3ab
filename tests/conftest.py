"""Shared test fixtures: fresh random generators, the rule registry copy, the cuda marker (helpers
live in modules of their own: fim_reference.py, fim_values.py, layer_models.py).

Every test draws fresh random data, from Python's ``random``, torch's global generator or the
``gen`` fixture, all seeded by one seed per test. The seed is printed (pytest shows it with a
failure, under "Captured stdout setup") and ``FISHER_FAST_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import os
import random
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


@pytest.fixture(autouse=True)
def test_seed() -> int:
    """One fresh seed per test, printed (pytest shows it with a failure) and replayed with
    ``FISHER_FAST_TEST_SEED=<seed>``: it seeds Python's ``random`` (which tests draw torch
    seeds from), torch's global generator (which draws the weights of a module built without
    a seed of its own, and any tensor drawn without a generator) and the ``gen`` generator, so
    every random test has one seed scheme and no test's data depend on the tests before it."""
    seed = int(os.environ.get("FISHER_FAST_TEST_SEED", secrets.randbits(62)))
    print(f"random seed {seed}; replay with FISHER_FAST_TEST_SEED={seed}")
    random.seed(seed)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def gen(test_seed: int) -> torch.Generator:
    """A CPU generator seeded with the test's seed."""
    return torch.Generator().manual_seed(test_seed)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: the tensors of the task, search and multi-process tests are
    tiny, and on a shared machine extra intra-op threads only contend (they made those tests tens
    of times slower); spawned ranks run one thread too, so references then use the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
