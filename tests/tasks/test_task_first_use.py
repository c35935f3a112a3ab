"""First use of the task API: thread defaults for the small probes, and optional packages that
are missing fail before any work starts, with the install command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from task_files import blob_source

from fisher_fast.tasks import Task, TrainConfig, distance_matrix
from fisher_fast.tasks import train as train_module

# train_probe is patched on the module that defines it, where the run looks it up when it
# trains a probe, so the tests hold however the run's own modules are arranged.

TINY = TrainConfig(epochs=1, batch_size=16, lr=1e-2)


def tasks() -> list[Task]:
    source = blob_source()
    return [Task("c0", source, [0], other=True), Task("all", source, [0, 1, 2, 3])]


@pytest.mark.parametrize(("threads", "expected"), [(None, 1), (2, 2)])
def test_small_probes_train_on_one_thread_by_default_and_the_setting_is_restored(
    monkeypatch: pytest.MonkeyPatch, threads: int | None, expected: int
) -> None:
    seen: list[int] = []
    train = train_module.train_probe

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_probe", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        distance_matrix(tasks(), "mlp", seeds=1, train=TINY, progress=False, threads=threads)
        assert torch.get_num_threads() == 3  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {expected}


def test_a_thread_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="threads must be a positive number"):
        distance_matrix(tasks(), "mlp", seeds=1, train=TINY, progress=False, threads=0)


# A fresh interpreter in which an optional package is not installed.
WITHOUT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules[sys.argv[1]] = None  # as if not installed: import fails, find_spec gives None
    import fisher_fast.tasks.train as train_module
    from fisher_fast.tasks import get_suite, distance_matrix

    trained = []
    train_module.train_probe = lambda *a, **k: trained.append(1) or 1 / 0
    try:
        distance_matrix(get_suite("digits"), "mlp", seeds=1, out=sys.argv[2], progress=False)
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc)]
    print(json.dumps({"error": error, "trained": len(trained)}))
    """
)


@pytest.mark.parametrize(
    ("module", "package"), [("matplotlib", "pip install matplotlib"), ("sklearn", "scikit-learn")]
)
def test_a_missing_optional_package_stops_the_run_before_any_work(
    tmp_path: Path, module: str, package: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_SCRIPT, module, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["trained"] == 0, "work started before the missing package was noticed"
    kind, message = result["error"]
    assert kind == "MissingDependencyError"
    assert package in message and "'experiments' extra" in message


def test_a_rerun_with_other_settings_is_refused_before_any_work_unless_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = distance_matrix(tasks(), "mlp", seeds=1, train=TINY, out=tmp_path, progress=False)
    saved = (tmp_path / "results-exact.json").read_text()
    trained: list[int] = []
    train = train_module.train_probe
    monkeypatch.setattr(
        train_module, "train_probe", lambda *a, **k: trained.append(1) or train(*a, **k)
    )
    other = TrainConfig(epochs=2, batch_size=16, lr=1e-2)
    with pytest.raises(ValueError, match=r"other settings \(train differ\).*--overwrite"):
        distance_matrix(tasks(), "mlp", seeds=1, train=other, out=tmp_path, progress=False)
    assert trained == [] and (tmp_path / "results-exact.json").read_text() == saved
    again = distance_matrix(tasks(), "mlp", seeds=1, train=TINY, out=tmp_path, progress=False)
    assert trained == [] and torch.equal(again.values, first.values)  # same settings: cached
    distance_matrix(
        tasks(), "mlp", seeds=1, train=other, out=tmp_path, progress=False, overwrite=True
    )
    assert trained and json.loads((tmp_path / "results-exact.json").read_text())["config"][
        "train"
    ] == json.loads(json.dumps(other.to_dict()))
