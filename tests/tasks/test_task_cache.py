"""The run directory: a rerun trains and computes nothing; bad files are detected and redone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from call_counter import CallCounter
from task_files import blob_source

from fisher_fast.io import atomic_write
from fisher_fast.tasks import CacheWarning, DistanceResult, Task, TrainConfig, distance_matrix
from fisher_fast.tasks import task_fisher as fim_module
from fisher_fast.tasks import train as train_module
from fisher_fast.tasks.cache import RunCache, config_key

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def _tasks() -> list[Task]:
    source = blob_source()
    return [
        Task("detect c0", source, [0], other=True),
        Task("c1 c2 rest", source, [1, 2], other=True),
        Task("all", source, [0, 1, 2, 3]),
    ]


def trainings(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> CallCounter:
    """Counts the probes trained (``train_probe`` calls) from now on."""
    return CallCounter(monkeypatch, train_module, "train_probe", fail_after)


def fims_computed(monkeypatch: pytest.MonkeyPatch) -> CallCounter:
    """Counts the FIMs computed (``task_fim`` calls, one ``diag_fim`` each) from now on."""
    return CallCounter(monkeypatch, fim_module, "task_fim")


def _run(out: Path, **kwargs: Any) -> DistanceResult:
    options: dict[str, Any] = {
        "seeds": 2,
        "train": TrainConfig(epochs=3, batch_size=16, lr=1e-2),
        "progress": False,
        "epsilon": 0.5,
    }
    return distance_matrix(_tasks(), "mlp", out=out, **{**options, **kwargs})


def test_second_run_trains_and_computes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, fims = trainings(monkeypatch), fims_computed(monkeypatch)
    first = _run(tmp_path)
    assert (trained.calls, fims.calls) == (6, 18)
    second = _run(tmp_path)
    assert (trained.calls, fims.calls) == (6, 18)
    torch.testing.assert_close(second.values, first.values, rtol=0, atol=0)
    torch.testing.assert_close(second.test_accuracy, first.test_accuracy, rtol=0, atol=0)
    # Another Fisher kind reuses the trained probes and computes only its own FIMs.
    _run(tmp_path, fisher="empirical")
    assert (trained.calls, fims.calls) == (6, 36)
    saved = json.loads((tmp_path / "results-exact.json").read_text())
    assert (
        saved["values"] == first.values.tolist() and (tmp_path / "distance-empirical.png").is_file()
    )
    # A changed configuration is a different key: trained anew, old cache files left alone
    # (its results replace the old ones only when asked to).
    _run(tmp_path, seeds=[0], train=TrainConfig(epochs=2, batch_size=16, lr=1e-2), overwrite=True)
    assert trained.calls == 9


def test_interrupted_run_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = trainings(monkeypatch, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    assert len(list((tmp_path / "probes").glob("*.safetensors"))) == 4
    trained.fail_after = None
    fims = fims_computed(monkeypatch)
    _run(tmp_path)
    assert trained.calls == 6 and fims.calls == 18 - 9  # the first seed's FIMs were done
    assert not list(tmp_path.rglob("*.tmp"))


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x55
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_damaged_probe_is_detected_and_retrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    first = _run(tmp_path)
    files = sorted((tmp_path / "probes").glob("*.safetensors"))
    if damage == "flip":
        _flip_last_byte(files[0])
    elif damage == "truncate":
        files[0].write_bytes(files[0].read_bytes()[:100])
    else:
        files[0].write_bytes(files[1].read_bytes())  # a valid file of another configuration
    trained = trainings(monkeypatch)
    with pytest.warns(CacheWarning, match=f"ignoring cached file .*{files[0].name}"):
        second = _run(tmp_path)
    assert trained.calls == 1
    torch.testing.assert_close(
        second.values, first.values, rtol=0, atol=0
    )  # training is deterministic


def test_damaged_fim_is_detected_and_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _run(tmp_path)
    target = sorted((tmp_path / "fims" / "exact").glob("*.safetensors"))[5]
    _flip_last_byte(target)
    fims = fims_computed(monkeypatch)
    with pytest.warns(CacheWarning, match="corrupted"):
        second = _run(tmp_path)
    assert fims.calls == 1
    torch.testing.assert_close(second.values, first.values, rtol=0, atol=0)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_state_round_trip_checks_key_and_content(tmp_path: Path) -> None:
    cache = RunCache(tmp_path)
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    key = config_key({"a": 1})
    path = cache.probe_path("p", key)
    digest = cache.save_state(path, key, state, {"note": "x"})
    loaded = cache.load_state(path, key)
    assert loaded is not None and loaded[1] == {"note": "x"} and loaded[2] == digest
    assert torch.equal(loaded[0]["w"], state["w"])
    with pytest.warns(CacheWarning, match="another configuration"):
        assert cache.load_state(path, config_key({"a": 2})) is None
