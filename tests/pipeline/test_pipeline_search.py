"""Algorithm 1 (search_architecture) and the main job on tiny settings: the closest baseline is
the argmin of independently recomputed distances, the search stays in its restricted space,
the test split decides nothing, and the whole report is reproducible."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_FUSE, TINY_SETTINGS, digit_tasks

from fisher_fast.distance import frechet_distance
from fisher_fast.nas import SearchSpace
from fisher_fast.pipeline import (
    TaskDictionary,
    baseline_distances,
    build_dictionary,
    run_main_job,
    search_architecture,
)
from fisher_fast.tasks import Part, task_fim, train_probe
from fisher_fast.tasks.suites import digits_suite

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory: pytest.TempPathFactory) -> TaskDictionary:
    """Digits tasks 0, 1 and 3 as baselines (target: task 2)."""
    tasks = digit_tasks()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_dictionary(
            tmp_path_factory.mktemp("dict") / "d",
            [tasks[0], tasks[1], tasks[3]],
            TINY_SETTINGS,
            progress=False,
        )
    finally:
        torch.set_num_threads(before)


def test_distances_match_an_independent_computation(dictionary: TaskDictionary) -> None:
    target = digit_tasks()[2]
    distances, _ = baseline_distances(target, dictionary, seed=4)
    s = dictionary.settings
    probe = train_probe(target, s.arch, epsilon=0.9, seed=4, config=s.train, head_width=10)
    reference = task_fim(probe, target, split="val")
    assert list(distances) == dictionary.names()
    for name, d in distances.items():
        other = task_fim(dictionary.load_probe(name), target, split="val")
        assert d == pytest.approx(float(frechet_distance(reference, other)), rel=1e-12)
        assert 0.0 < d < 1.0


def test_search_uses_the_closest_baselines_space(dictionary: TaskDictionary) -> None:
    report = search_architecture(
        digit_tasks()[2], dictionary, seed=1, final_steps=5, progress=False
    )
    assert report.closest == min(report.distances, key=report.distances.__getitem__)
    space = SearchSpace.restricted_to(dictionary[report.closest].genotype)
    assert report.space_size == space.size
    assert report.full_space_size == SearchSpace.full(TINY_SETTINGS.nodes).size
    assert all(c in space for r in report.search.history for c in r.candidates)
    assert report.search.genotype in space
    assert 0.0 <= report.evaluation.test_accuracy <= 1.0
    assert report.evaluation.parameters > 0


def _decisions(report: object) -> tuple:
    r = report  # an ArchitectureReport
    return (r.distances, r.closest, r.search.genotype, r.search.history)  # type: ignore[attr-defined]


def test_the_test_split_decides_nothing(
    dictionary: TaskDictionary, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = digit_tasks()[2]
    plain = search_architecture(target, dictionary, seed=2, final_steps=5, progress=False)
    splits = target.splits()
    noise = torch.Generator().manual_seed(0)
    scrambled = splits._replace(
        test=Part(
            torch.randn(splits.test.x.shape, generator=noise), torch.zeros_like(splits.test.y)
        )
    )
    monkeypatch.setattr(target, "splits", lambda: scrambled)
    other = search_architecture(target, dictionary, seed=2, final_steps=5, progress=False)
    assert _decisions(other) == _decisions(plain)
    # ...but the final evaluation did read the replaced test split.
    assert other.evaluation.test_accuracy != plain.evaluation.test_accuracy


def test_the_report_is_reproducible_and_resumes(dictionary: TaskDictionary, tmp_path: Path) -> None:
    target = digit_tasks()[2]
    first = search_architecture(
        target, dictionary, seed=5, final_steps=5, out=tmp_path, progress=False
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["closest"] == first.closest
    assert len(json.loads((tmp_path / "fuse.json").read_text())["rounds"]) == TINY_FUSE.rounds
    again = search_architecture(
        target, dictionary, seed=5, final_steps=5, out=tmp_path, progress=False
    )
    assert _decisions(again) == _decisions(first)
    assert again.evaluation.test_accuracy == first.evaluation.test_accuracy


def test_main_job_writes_table_1(tmp_path: Path) -> None:
    suite = replace(digits_suite(), train=TINY_SETTINGS.train, epsilon=0.9)
    result = run_main_job(
        suite, 2, tmp_path, config=TINY_FUSE, nodes=3, final_steps=5, progress=False
    )
    methods = [r.method for r in result.rows]
    assert methods[0].startswith("FUSE in S_a*")
    assert methods[1:3] == [
        "random search in S_a*, same budget",
        "FUSE in the full space, same setting",
    ]
    assert methods[3:] == ["hand-designed mlp", "hand-designed cnn", "hand-designed resnet"]
    saved = json.loads(result.json_path.read_text())
    assert [row["method"] for row in saved["table"]] == methods
    assert saved["baselines"] == ["detect 0", "detect 6", "all digits"]
    assert result.figure_path.stat().st_size > 0
    index = tmp_path / "dictionary" / "dictionary.json"
    stamp = index.stat().st_mtime_ns
    run_main_job(suite, 2, tmp_path, config=TINY_FUSE, nodes=3, final_steps=5, progress=False)
    assert index.stat().st_mtime_ns == stamp  # the dictionary is reused, not rebuilt


@pytest.mark.filterwarnings("ignore::fisher_fast.tasks.EpsilonWarning")  # one-epoch probes
def test_cli_builds_lists_and_searches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fisher_fast.cli import main

    d = tmp_path / "dict"
    tiny = ["--rounds", "1", "--candidates", "1", "--max-steps", "3", "--quiet", "--threads", "1"]
    main(
        [
            "dictionary",
            "build",
            "--exclude",
            "2",
            "--out",
            str(d),
            "--epochs",
            "1",
            "--nodes",
            "3",
            *tiny,
        ]
    )
    assert TaskDictionary.open(d).names() == ["detect 0", "detect 6", "all digits"]
    main(["dictionary", "list", str(d)])
    assert "3 baselines" in capsys.readouterr().out
    out = tmp_path / "search"
    main(["search", "--target", "0-3 + other", "--dictionary", str(d), "--out", str(out),
          "--final-steps", "3", *tiny])  # fmt: skip
    printed = capsys.readouterr().out
    assert "<- a*" in printed and "test accuracy" in printed
    assert json.loads((out / "report.json").read_text())["target"] == "0-3 + other"
    assert main(["search", "--target", "seven", "--dictionary", str(d)]) == 2
    assert "error: no task 'seven'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::fisher_fast.tasks.EpsilonWarning")  # one-epoch probes
def test_cli_builds_and_searches_the_tasks_of_a_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config FILE`` replaces ``--suite`` in ``dictionary build`` and ``search``: the tasks,
    their names and the suite's name (in the default run folder) are the file's."""
    from fisher_fast.cli import main

    config = tmp_path / "tasks.json"
    tasks = [
        {"name": "zero or not", "classes": [[0]], "other": True},
        {"name": "low digits", "classes": [0, 1, 2, 3], "other": True},
        {"name": "all ten", "classes": list(range(10))},
    ]
    spec = {"name": "my-digits", "source": {"format": "digits"}, "arch": "mlp", "tasks": tasks}
    config.write_text(json.dumps(spec))
    monkeypatch.chdir(tmp_path)  # the search's default run folder is under runs/
    tiny = ["--rounds", "1", "--candidates", "1", "--max-steps", "3", "--quiet", "--threads", "1"]
    d = tmp_path / "dict"
    build = ["dictionary", "build", "--config", str(config), "--exclude", "low digits"]
    assert main([*build, "--out", str(d), "--epochs", "1", "--nodes", "3", *tiny]) == 0
    assert TaskDictionary.open(d).names() == ["zero or not", "all ten"]
    capsys.readouterr()
    search = ["search", "--config", str(config), "--target", "1", "--dictionary", str(d)]
    assert main([*search, "--final-steps", "3", *tiny]) == 0
    assert "d(zero or not -> low digits)" in capsys.readouterr().out
    report = json.loads(Path("runs", "search-my-digits-1", "report.json").read_text())
    assert report["target"] == "low digits"


def test_a_restricted_space_of_one_cell_needs_no_search(
    dictionary: TaskDictionary, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fisher_fast.nas import Genotype

    single = Genotype(3, ("zero", "conv_3x3", "zero"))  # one live edge, one operation
    for name in dictionary.names():
        monkeypatch.setitem(dictionary._entries, name, replace(dictionary[name], genotype=single))
    report = search_architecture(
        digit_tasks()[2], dictionary, seed=0, final_steps=3, progress=False
    )
    assert report.space_size == 1
    assert report.search.genotype == single
    assert (report.search.history, report.search.steps) == ((), 0)
