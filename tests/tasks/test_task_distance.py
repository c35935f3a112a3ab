"""Task distances end to end: Definition 4, the matrix over seeds, label conventions, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from task_files import blob_source

import fisher_fast
from fisher_fast.cli import build_parser, main
from fisher_fast.tasks import (
    LABEL_CONVENTIONS,
    Task,
    TrainConfig,
    distance_matrix,
    format_matrix,
    get_suite,
    make_probe,
    task_distance,
    task_fim,
    train_probe,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def test_digits_matrix_end_to_end(tmp_path: Path) -> None:
    suite = get_suite("digits")
    result = distance_matrix(
        suite,
        "mlp",
        seeds=2,
        train=TrainConfig(epochs=8, batch_size=64, lr=3e-3),
        out=tmp_path,
        progress=False,
    )
    assert result.values.shape == (2, 4, 4) and result.values.dtype == torch.float64
    assert torch.all(result.values.diagonal(dim1=1, dim2=2) < 1e-6)
    assert torch.all((result.values >= 0) & (result.values <= 1))
    off = result.values[:, ~torch.eye(4, dtype=torch.bool)]
    assert torch.all(off > 0.05)  # different tasks give visibly different FIMs
    torch.testing.assert_close(result.std, result.values.std(0))
    assert result.test_accuracy.min() > 0.8 and result.reached.all()
    saved = json.loads((tmp_path / "results-exact.json").read_text())
    assert saved["tasks"] == ["detect 0", "detect 6", "0-3 + other", "all digits"]
    assert (
        saved["label_convention"] == LABEL_CONVENTIONS["exact"] and saved["rows"] == "source task"
    )
    assert np.allclose(saved["mean"], result.mean.numpy()) and len(saved["values"]) == 2
    assert (tmp_path / "distance-exact.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_matrix(result)
    assert "mean ± std over 2 seeds" in text and f"{float(result.mean[2, 3]):.4f}" in text


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_task_distance_is_the_matrix_entry(fisher: str) -> None:
    source = blob_source()
    tasks = [Task("detect c0", source, [0], other=True), Task("all", source, [0, 1, 2, 3])]
    train = TrainConfig(epochs=4, batch_size=16, lr=1e-2)
    result = distance_matrix(
        tasks,
        "cnn",
        seeds=[5],
        fisher=fisher,
        mc_samples=2,
        train=train,
        epsilon=0.5,
        progress=False,
    )
    probes = [train_probe(t, "cnn", seed=5, config=train, head_width=4, epsilon=0.5) for t in tasks]
    d = task_distance(probes[0], probes[1], tasks[1], fisher=fisher, mc_samples=2, seed=5)
    assert d == pytest.approx(float(result.values[0, 0, 1]), abs=1e-12)
    assert task_distance(probes[1], probes[1], tasks[1], fisher=fisher, mc_samples=2, seed=5) < 1e-6


def test_label_conventions_of_the_fisher_kinds() -> None:
    task = Task("all", blob_source(), [0, 1, 2, 3])
    model = make_probe("mlp", (1, 4, 4), 4, seed=0)
    test = task.splits().test
    exact = task_fim(model, task, fisher="exact")
    torch.testing.assert_close(
        exact.flat, fisher_fast.diag_fim(model, test.x, fisher="exact", progress=False).flat
    )
    empirical = task_fim(model, task, fisher="empirical")
    expected = fisher_fast.diag_fim(model, (test.x, test.y), fisher="empirical", progress=False)
    torch.testing.assert_close(empirical.flat, expected.flat)


def test_structurally_different_probes_and_duplicate_names_are_refused() -> None:
    task = Task("all", blob_source(), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="Definition 3 needs structurally similar networks"):
        task_distance(make_probe("mlp", (1, 4, 4), 4), make_probe("mlp", (1, 4, 4), 5), task)
    with pytest.raises(ValueError, match=r"task names must be unique .* \['all'\]"):
        distance_matrix([task, Task("all", task.source, [0, 1])], "mlp", progress=False)
    with pytest.raises(ValueError, match="fisher must be one of"):
        distance_matrix(
            [task, Task("two", task.source, [0, 1])], "mlp", fisher="true", progress=False
        )


def test_cli_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["distance", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    distance = commands.choices["distance"]
    for action in distance._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help and action.help != "==SUPPRESS=="


def test_cli_runs_a_config_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = (g.normal(size=(3, 1, 4, 4)) * 3)[y] + 0.3 * g.normal(size=(90, 1, 4, 4))
    np.savez(tmp_path / "d.npz", x=x.astype(np.float32), y=y)
    spec = {
        "source": {"format": "npz", "path": "d.npz"},
        "tasks": [
            {"name": "zero", "classes": [0], "other": True},
            {"name": "all", "classes": [0, 1, 2]},
        ],
    }
    (tmp_path / "t.json").write_text(json.dumps(spec))
    out = tmp_path / "run"
    args = [
        "distance",
        "--config",
        str(tmp_path / "t.json"),
        "--seeds",
        "2",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--out",
        str(out),
        "--quiet",
        "--fisher",
        "empirical",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mean ± std over 2 seeds" in text and "closest source task" in text
    assert (out / "results-empirical.json").is_file() and (out / "distance-empirical.png").is_file()
    assert main(["distance", "--suite", "cifar10"]) == 2  # one error line, no traceback
    assert "pass the folder that holds it" in capsys.readouterr().err
