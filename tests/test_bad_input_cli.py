"""Bad input to the command line (issue #12): an expected error is one ``error: ...`` line on
stderr and exit status 2, Ctrl-C one line and 130, never a traceback unless asked for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fisher_fast
from fisher_fast.cli import main
from fisher_fast.pipeline import TaskDictionary

TINY = ["--epochs", "1", "--nodes", "3", "--rounds", "1", "--candidates", "1", "--max-steps", "3"]
QUIET = ["--quiet", "--threads", "1"]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m fisher_fast.cli ARGS`` in a subprocess, with this checkout first on the path."""
    root = str(Path(fisher_fast.__file__).parent.parent)
    environment = {**os.environ, "PYTHONPATH": root, **env}
    return subprocess.run(
        [sys.executable, "-m", "fisher_fast.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert fisher_fast.__version__ in result.stdout and torch.__version__ in result.stdout


def test_missing_data_path(tmp_path: Path) -> None:
    result = run_cli("distance", "--suite", "mnist", "--data", str(tmp_path / "nope"), "--quiet")
    assert_one_error_line(result, "MNIST not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "command",
    [
        ("distance", "--seeds", "1"),
        ("demo",),
        ("dictionary", "build"),
        ("search", "--target", "2", "--dictionary", "nowhere"),
    ],
    ids=lambda c: c[0] if c[0] != "dictionary" else "dictionary-build",
)
def test_cuda_device_without_cuda(command: tuple[str, ...], tmp_path: Path) -> None:
    """Every command that trains or computes FIMs takes --device and refuses a missing one
    before any work (nothing is written to --out)."""
    result = run_cli(*command, "--device", "cuda", "--out", str(tmp_path / "out"))
    assert_one_error_line(result, "--device: device cuda is not available on this machine")
    assert not (tmp_path / "out").exists()


def test_missing_dictionary_and_the_traceback_switch(tmp_path: Path) -> None:
    result = run_cli("dictionary", "list", str(tmp_path))
    assert_one_error_line(result, f"no task dictionary in {tmp_path}")
    shown = run_cli("dictionary", "list", str(tmp_path), FISHER_FAST_TRACEBACK="1")
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("fisher_fast.pipeline.dictionary.TaskDictionary.open", interrupt)
    assert main(["dictionary", "list", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr("fisher_fast.commands.dictionary.build_dictionary", interrupt)
    out = tmp_path / "d"
    assert main(["dictionary", "build", "--out", str(out), *TINY, *QUIET]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; finished work is saved in {out}, rerun the same command to resume"
    )


@pytest.fixture(scope="module")
def two_baselines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dictionary of digits tasks 0 and 1, built by the command line."""
    root = tmp_path_factory.mktemp("cli") / "dict"
    build = ["dictionary", "build", "--exclude", "2", "--exclude", "3", "--out", str(root)]
    assert main([*build, *TINY, *QUIET]) == 0
    return root


@pytest.mark.filterwarnings("ignore::fisher_fast.tasks.EpsilonWarning")  # one-epoch probes
def test_damaged_probe_advises_the_replace_flag(
    two_baselines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = shutil.copytree(two_baselines, tmp_path / "dict")
    probe = root / TaskDictionary.open(root)["detect 0"].probe_file
    data = bytearray(probe.read_bytes())
    data[-5] ^= 0xFF
    probe.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["dictionary", "list", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--replace 'detect 0'" in err and "replace=True" in err
    rebuild = ["dictionary", "build", "--exclude", "2", "--exclude", "3", "--out", str(root)]
    assert main([*rebuild, "--replace", "0", *TINY, *QUIET]) == 0
    assert TaskDictionary.open(root).names() == ["detect 0", "detect 6"]


@pytest.mark.filterwarnings("ignore::fisher_fast.tasks.EpsilonWarning")
def test_search_leaves_the_target_out_of_the_candidates(
    two_baselines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    search = ["search", "--target", "0", "--dictionary", str(two_baselines)]
    out = ["--out", str(tmp_path / "run"), "--final-steps", "3"]
    assert (
        main([*search, *out, "--rounds", "1", "--candidates", "1", "--max-steps", "3", *QUIET]) == 0
    )
    printed = capsys.readouterr().out
    assert "note: the target 'detect 0' is itself a baseline" in printed
    assert "d(detect 0 ->" not in printed and "d(detect 6 -> detect 0)" in printed


def test_search_refuses_a_dictionary_of_only_the_target(
    two_baselines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "only"
    dictionary = TaskDictionary.open(two_baselines)
    only = TaskDictionary.create(root, dictionary.settings)
    shutil.copytree(two_baselines / "probes", root / "probes")
    only._entries = {"detect 0": dictionary["detect 0"]}
    only._write_index()
    capsys.readouterr()
    assert main(["search", "--target", "0", "--dictionary", str(root), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds only the target 'detect 0'" in err


def test_missing_optional_package_is_one_line_before_any_work(tmp_path: Path) -> None:
    """Without matplotlib, ``distance`` stops at once (no run directory content) and says how
    to install it; before, it did all the work and crashed drawing the figure."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    root = str(Path(fisher_fast.__file__).parent.parent)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fisher_fast.cli", "distance", "--seeds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{root}"},
        timeout=300,
    )
    assert_one_error_line(result, "needs matplotlib, which is not installed: pip install")
    assert not out.exists() or not any(out.iterdir())
