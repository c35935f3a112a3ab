"""The searches on 2 CPU processes (gloo, loopback): FUSE trains its candidates data-parallel
(DistributedDataParallel), every rank ends with the same result, and without BatchNorm that
result is the single-process one up to float rounding; the Algorithm 1 pipeline writes its
files once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_ranks
from torch import nn

from fisher_fast.nas import FuseConfig, Genotype, SearchSpace, Skeleton, fuse_search
from fisher_fast.tasks import Part

SPACE = SearchSpace(3, ["identity", "avg_pool_3x3", "conv_3x3"])
CONFIG = FuseConfig(
    candidates=2,
    rounds=2,
    max_steps=12,
    check_every=4,
    batch_size=15,  # shards of 7 and 8 samples: uneven
    weight_lr=0.02,
    alpha_lr=0.2,
    skeleton=Skeleton(channels=2, stages=1),
)


def toy_data() -> Part:
    """60 images (1, 4, 4) of two classes told apart by mean brightness."""
    g = torch.Generator().manual_seed(11)
    y = torch.arange(60) % 2
    return Part((2.0 * y - 1.0).view(60, 1, 1, 1) + torch.randn(60, 1, 4, 4, generator=g), y)


def mlp_without_batchnorm(genotype: Genotype) -> nn.Module:
    """A small MLP whose width depends on the cell, so that candidates differ; no BatchNorm."""
    width = 3 + int(genotype.stable_hash()[:2], 16) % 5
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 2))


def search(checkpoint: Path | None, batchnorm: bool) -> tuple[Any, ...]:
    result = fuse_search(
        SPACE,
        toy_data(),
        num_classes=2,
        generator=torch.Generator().manual_seed(5),
        config=CONFIG,
        build=None if batchnorm else mlp_without_batchnorm,
        checkpoint=checkpoint,
    )
    return result.genotype, result.history, torch.tensor(result.alphas, dtype=torch.float64)


def fuse_on_rank(rank: int, tmp_path: Path, batchnorm: bool) -> tuple[Any, ...]:
    return search(tmp_path / "fuse.json", batchnorm)


@pytest.mark.slow
def test_fuse_without_batchnorm_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    outcomes = run_ranks(fuse_on_rank, 2, tmp_path, tmp_path, False)
    assert [o.error for o in outcomes] == [None, None]
    torch.set_num_threads(1)
    genotype, history, alphas = search(None, batchnorm=False)
    for outcome in outcomes:
        got_genotype, got_history, got_alphas = outcome.value
        assert got_genotype == genotype
        assert [r.candidates for r in got_history] == [r.candidates for r in history]
        assert [r.winner for r in got_history] == [r.winner for r in history]
        # the same gradients summed in another order: float rounding only
        torch.testing.assert_close(got_alphas, alphas, rtol=1e-4, atol=1e-6)
    assert outcomes[0].value[0] == outcomes[1].value[0]
    assert torch.equal(outcomes[0].value[2], outcomes[1].value[2])
    saved = json.loads((tmp_path / "fuse.json").read_text())
    assert len(saved["rounds"]) == CONFIG.rounds


@pytest.mark.slow
def test_fuse_with_batchnorm_agrees_on_every_rank(tmp_path: Path) -> None:
    outcomes = run_ranks(fuse_on_rank, 2, tmp_path, tmp_path, True)
    assert [o.error for o in outcomes] == [None, None]
    (g0, h0, a0), (g1, h1, a1) = (o.value for o in outcomes)
    assert g0 == g1 and torch.equal(a0, a1)
    assert h0 == h1  # alphas, winners and validation accuracies (buffers synced from rank 0)


def pipeline_on_rank(rank: int, tmp_path: Path) -> dict[str, Any]:
    from fisher_fast.pipeline import DictionarySettings, build_dictionary, search_architecture
    from fisher_fast.tasks import TrainConfig
    from fisher_fast.tasks.suites import digits_suite

    settings = DictionarySettings(
        "mlp", (1, 8, 8), 10, TrainConfig(epochs=2, batch_size=64), CONFIG, nodes=3, epsilon=0.9
    )
    tasks = digits_suite().tasks
    d = build_dictionary(tmp_path / "dict", [tasks[0], tasks[3]], settings, progress=False)
    report = search_architecture(tasks[2], d, final_steps=6, out=tmp_path / "search")
    return {"names": d.names(), "report": report.to_dict()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::fisher_fast.tasks.EpsilonWarning")
def test_pipeline_on_two_ranks_agrees_and_writes_once(tmp_path: Path) -> None:
    outcomes = run_ranks(pipeline_on_rank, 2, tmp_path, tmp_path)
    assert [o.error for o in outcomes] == [None, None]
    first, second = (o.value for o in outcomes)
    assert first["names"] == second["names"] == ["detect 0", "all digits"]
    for key in ("distances", "closest", "space_size"):
        assert first["report"][key] == second["report"][key]
    assert first["report"]["search"]["rounds"] == second["report"]["search"]["rounds"]
    assert (
        first["report"]["evaluation"]["test_accuracy"]
        == (second["report"]["evaluation"]["test_accuracy"])
    )
    saved = json.loads((tmp_path / "search" / "report.json").read_text())
    assert saved["closest"] == first["report"]["closest"]
    assert len(list((tmp_path / "dict" / "probes").iterdir())) == 2
    assert not list(tmp_path.rglob(".*.tmp"))
