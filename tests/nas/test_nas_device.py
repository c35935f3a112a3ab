"""The searches and the final training on a chosen device: the same results on the CPU whether
the device is given or not, every tensor where the device says, a clear error for a device this
machine lacks, and (where there is a GPU) the same choices on it as on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from nas_search_helpers import THREE_OPS, TINY, toy_part
from torch import nn

from fisher_fast.nas import SearchSpace, fuse_search, random_search, train_and_evaluate
from fisher_fast.nas.training import build_seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def _fuse(**device: Any) -> Any:
    return fuse_search(
        THREE_OPS, toy_part(64, 1), num_classes=2,
        generator=torch.Generator().manual_seed(3), config=TINY, **device,
    )  # fmt: skip


def _random(**device: Any) -> Any:
    return random_search(
        THREE_OPS, toy_part(64, 1), num_classes=2, budget=40,
        generator=torch.Generator().manual_seed(3), config=TINY, **device,
    )  # fmt: skip


def _final(**device: Any) -> Any:
    genotype = THREE_OPS.sample(1, torch.Generator().manual_seed(0))[0]
    return train_and_evaluate(
        genotype, toy_part(64, 1), toy_part(32, 2), num_classes=2, steps=10,
        generator=torch.Generator().manual_seed(4), config=TINY, val_data=toy_part(16, 3),
        check_every=5, **device,
    )  # fmt: skip


RUNS: dict[str, Callable[..., Any]] = {"fuse": _fuse, "random": _random, "final": _final}


def _decisions(result: Any) -> Any:
    if hasattr(result, "history"):
        return result.genotype, [(r.candidates, r.alphas, r.val_accuracy) for r in result.history]
    return result.test_accuracy, result.parameters


@pytest.mark.parametrize("run", list(RUNS))
def test_the_cpu_given_explicitly_changes_nothing(run: str) -> None:
    plain = _decisions(RUNS[run]())
    assert _decisions(RUNS[run](device="cpu")) == plain
    assert _decisions(RUNS[run](device=torch.device("cpu"))) == plain


@pytest.mark.parametrize("run", list(RUNS))
def test_a_device_this_machine_lacks_is_refused_first(run: str) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU box)
    with pytest.raises(ValueError, match=r"device=\.\.\.\): device cuda:\d+ is not available"):
        RUNS[run](device=missing)
    with pytest.raises(ValueError, match="is not a device name"):
        RUNS[run](device="gpu please")


def test_networks_are_initialised_on_the_cpu_then_moved() -> None:
    """The initialisation is drawn on the CPU whatever the device (here the tensor-less "meta"
    device), so the device cannot change the random choices; the network ends up there."""
    seen: list[torch.device] = []

    def build(genotype: Any) -> nn.Module:
        net = TINY.skeleton.builder((1, 4, 4), 2)(genotype)
        seen.append(next(net.parameters()).device)
        return net

    genotype = SearchSpace(3, ["identity", "conv_3x3"]).sample(1, torch.Generator())[0]
    net = build_seeded(build, genotype, 7, torch.device("meta"))
    assert seen == [torch.device("cpu")]
    assert {p.device.type for p in net.parameters()} == {"meta"}


@pytest.mark.cuda  # selected by `pytest -m cuda` (scripts/device_check.sh)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_choices_match_the_cpu() -> None:
    """Same random choices; float arithmetic differs, so the accuracies agree to a few samples."""
    cpu, gpu = _fuse(), _fuse(device="cuda")
    assert [r.candidates for r in gpu.history] == [r.candidates for r in cpu.history]
    final_cpu, final_gpu = _final(), _final(device="cuda")
    assert abs(final_gpu.test_accuracy - final_cpu.test_accuracy) <= 2 / 32
