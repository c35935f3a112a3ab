"""diag_fim and the distance matrix on 2 CPU processes (gloo on loopback) against one process.

Each test spawns its processes itself (tests/dist_helpers.py, or torchrun for the CLI), so the
whole file runs in CI with `make test`; together the tests take about a minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from call_counter import CallCounter
from dist_helpers import TIMEOUT, free_port, run_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fisher_fast
from fisher_fast import distributed
from fisher_fast.distributed import shard, shard_range
from fisher_fast.tasks import distance_matrix
from fisher_fast.tasks import task_fisher as fim_module
from fisher_fast.tasks import train as train_module
from fisher_fast.tasks.job_schedule import tasks_of_rank
from fisher_fast.tasks.loaders.config import load_task_config

N = 37  # odd: two ranks get uneven shards

pytestmark = pytest.mark.usefixtures("one_thread")  # as in every spawned rank


def small_cnn() -> nn.Module:
    """Two convolutions and a linear head on (2, 8, 8) inputs, 5 classes; fixed weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, 8, 8) inputs and (N,) labels in 0..4."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 2, 8, 8, generator=g), torch.randint(0, 5, (N,), generator=g)


def fim_cases(rank: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Each case's FIM on this rank: (flat values, number of samples)."""
    model, (x, y) = small_cnn(), data()
    own = shard_range(N)
    cases = {
        "even": fisher_fast.diag_fim(
            model, shard((x[:36], y[:36])), fisher="empirical", batch_size=7
        ),
        "uneven exact": fisher_fast.diag_fim(model, shard((x, None)), fisher="exact", batch_size=7),
        # rank 0 holds no sample at all
        "one empty": fisher_fast.diag_fim(model, (x[: rank * N], y[: rank * N]), batch_size=9),
        "loader float64": fisher_fast.diag_fim(
            model,
            DataLoader(shard(TensorDataset(x, y)), batch_size=5),
            fisher="empirical",
            dtype=torch.float64,
        ),
        "local only": fisher_fast.diag_fim(
            model, (x[own.start : own.stop], y[own.start : own.stop]), distributed=False
        ),
    }
    return {name: (fim.flat, fim.n_samples) for name, fim in cases.items()}


def test_fim_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    outcomes = run_ranks(fim_cases, 2, tmp_path)
    assert [o.error for o in outcomes] == [None, None]
    model, (x, y) = small_cnn(), data()
    references = {
        "even": fisher_fast.diag_fim(model, (x[:36], y[:36]), fisher="empirical"),
        "uneven exact": fisher_fast.diag_fim(model, (x, None), fisher="exact"),
        "one empty": fisher_fast.diag_fim(model, (x, y)),
        "loader float64": fisher_fast.diag_fim(model, (x, y), dtype=torch.float64),
    }
    for name, reference in references.items():
        for outcome in outcomes:
            flat, n = outcome.value[name]
            assert n == reference.n_samples, name
            assert flat.dtype == reference.flat.dtype
            # same sums in another order: float rounding only
            torch.testing.assert_close(flat, reference.flat, rtol=1e-5, atol=0, msg=name)
        assert torch.equal(outcomes[0].value[name][0], outcomes[1].value[name][0]), name
    for rank, outcome in enumerate(outcomes):
        own = shard_range(N, rank, 2)
        flat, n = outcome.value["local only"]
        expected = fisher_fast.diag_fim(model, (x[own.start : own.stop], y[own.start : own.stop]))
        assert n == len(own) and torch.equal(flat, expected.flat)


def fim_failing_on_rank_1(rank: int) -> None:
    x, y = data()
    if rank == 1:
        x = x.clone()
        x[-1] = float("nan")  # in rank 1's shard
    fisher_fast.diag_fim(small_cnn(), shard((x, y)))


def test_failure_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    start = time.perf_counter()
    outcomes = run_ranks(fim_failing_on_rank_1, 2, tmp_path)
    assert time.perf_counter() - start < TIMEOUT.total_seconds()  # no rank waited for a timeout
    for outcome in outcomes:
        assert outcome.error is not None
        assert outcome.error.startswith(
            "RankError: diag_fim failed on rank 1 of 2: FloatingPointError"
        )
        assert "the loss is not finite" in outcome.error


def crash_on_rank_1(rank: int) -> None:
    if rank == 1:
        raise ValueError("simulated failure")
    dist.barrier()  # rank 0 waits for a rank that is gone


def test_crash_outside_a_collective_names_the_rank_and_does_not_hang(tmp_path: Path) -> None:
    start = time.perf_counter()
    outcomes = run_ranks(crash_on_rank_1, 2, tmp_path)
    assert time.perf_counter() - start < TIMEOUT.total_seconds()
    assert outcomes[1].error == "RankError: rank 1 of 2 failed: ValueError: simulated failure"
    assert outcomes[0].error is not None
    assert outcomes[0].error.startswith(
        "RankError: rank 0 of 2 stopped because rank 1 failed: ValueError: simulated failure"
    )


def test_helpers_without_a_process_group() -> None:
    x = torch.arange(5)
    assert torch.equal(shard(x), x) and tasks_of_rank(
        0, 3, distributed.rank(), distributed.world_size()
    ) == [0, 1, 2]
    assert [shard_range(7, r, 3) for r in range(3)] == [range(0, 2), range(2, 4), range(4, 7)]
    assert shard_range(1, 0, 2) == range(0, 0)
    with pytest.raises(ValueError, match=r"needs an initialised torch\.distributed process group"):
        fisher_fast.diag_fim(small_cnn(), data(), distributed=True)
    with pytest.raises(ValueError, match=r"rank 2 is outside 0\.\.1"):
        shard_range(4, 2, 2)
    with pytest.raises(TypeError, match="shard takes a tensor"):
        shard([1, 2])


def write_config(path: Path, tasks: int, epochs: int = 3) -> Path:
    """A task file of the first ``tasks`` digit tasks with tiny training settings."""
    all_tasks = [
        {"name": "detect 0", "classes": [[0]], "other": True},
        {"name": "0-3 + other", "classes": [0, 1, 2, 3], "other": True},
        {"name": "all digits", "classes": list(range(10))},
    ]
    path.write_text(
        json.dumps(
            {
                "name": "digits-small",
                "source": {"format": "digits"},
                "arch": "mlp",
                "epsilon": 0.5,
                "train": {"epochs": epochs, "batch_size": 64, "lr": 0.003},
                "tasks": all_tasks[:tasks],
            }
        )
    )
    return path


def matrix_on_rank(rank: int, config: Path, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    suite = load_task_config(config)
    result = distance_matrix(suite, "mlp", seeds=[0, 1], out=out, progress=False)
    return result.values, result.test_accuracy


def cache_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))


@pytest.mark.slow
def test_distance_matrix_over_two_ranks_shares_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 tasks x 2 seeds: 6 jobs dealt 3 / 3, each rank training different probes."""
    config = write_config(tmp_path / "tasks.json", tasks=3, epochs=2)
    outcomes = run_ranks(matrix_on_rank, 2, tmp_path, config, tmp_path / "multi")
    assert [o.error for o in outcomes] == [None, None]
    suite = load_task_config(config)
    single = distance_matrix(suite, "mlp", seeds=[0, 1], out=tmp_path / "single", progress=False)
    for values, accuracy in (o.value for o in outcomes):
        assert torch.equal(values, single.values) and torch.equal(accuracy, single.test_accuracy)
    assert cache_files(tmp_path / "multi") == cache_files(tmp_path / "single")
    # A single process on the multi-process run directory reuses every file.
    trained = CallCounter(monkeypatch, train_module, "train_probe")
    fims = CallCounter(monkeypatch, fim_module, "task_fim")  # one diag_fim each
    again = distance_matrix(suite, "mlp", seeds=[0, 1], out=tmp_path / "multi", progress=False)
    assert (trained.calls, fims.calls) == (0, 0) and torch.equal(again.values, single.values)


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    """The unchanged command line, launched by torchrun on 2 processes: 2 tasks, 1 seed."""
    config = write_config(tmp_path / "tasks.json", tasks=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "fisher_fast.cli",
        "distance",
        "--config",
        str(config),
        "--seeds",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--dist-timeout",
        "1",
        "--out",
        str(tmp_path / "multi"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout.count("2 processes share the work (gloo backend)") == 1  # rank 0 only
    suite = load_task_config(config)
    single = distance_matrix(suite, "mlp", seeds=1, out=tmp_path / "single", progress=False)
    saved = json.loads((tmp_path / "multi" / "results-exact.json").read_text())
    assert saved["values"] == single.values.tolist() and saved["config"]["processes"] == 2
    assert (tmp_path / "multi" / "distance-exact.png").is_file()
