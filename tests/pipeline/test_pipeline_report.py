"""The main job's report on tiny settings: distances and a* under both the exact and the
empirical Fisher (from one trained target probe, the dictionary's kind deciding), and a printed
table that says how many test images and seeds its accuracies rest on and how to read the cells."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_helpers import TINY_FUSE, TINY_SETTINGS, digit_tasks

from fisher_fast.distance import frechet_distance
from fisher_fast.pipeline import (
    DictionarySettings,
    MainJobResult,
    Row,
    TaskDictionary,
    build_dictionary,
    closest_baseline,
    format_table,
    run_main_job,
    search_architecture,
)
from fisher_fast.tasks import Task, task_fim, train_probe
from fisher_fast.tasks.suites import digits_suite

# Names new with the two-kind report are imported inside the tests that use them.

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

KINDS = ("exact", "empirical")


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> TaskDictionary:
    """Digits tasks 0, 1 and 3 as baselines (target: task 2)."""
    tasks = digit_tasks()
    return build_dictionary(
        tmp_path_factory.mktemp("dict") / "d",
        [tasks[0], tasks[1], tasks[3]],
        TINY_SETTINGS,
        progress=False,
    )


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> MainJobResult:
    suite = replace(digits_suite(), train=TINY_SETTINGS.train, epsilon=0.9)
    return run_main_job(
        suite,
        2,
        tmp_path_factory.mktemp("main"),
        config=TINY_FUSE,
        nodes=3,
        final_steps=5,
        progress=False,
    )


def _count_target_probes(monkeypatch: pytest.MonkeyPatch, target: Task) -> list[int]:
    """Count the dictionary-settings probe trainings of ``target`` (one entry per call)."""
    calls: list[int] = []
    original = DictionarySettings.train_probe

    def counting(self: DictionarySettings, task: Task, seed: int, *device: Any) -> Any:
        if task.name == target.name:
            calls.append(seed)
        return original(self, task, seed, *device)

    monkeypatch.setattr(DictionarySettings, "train_probe", counting)
    return calls


def test_both_kinds_come_from_one_target_probe(
    dictionary: TaskDictionary, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = digit_tasks()[2]
    calls = _count_target_probes(monkeypatch, target)
    report = search_architecture(target, dictionary, seed=3, final_steps=3, progress=False)
    assert calls == [3]  # trained once for all the kinds
    assert report.fisher == dictionary.settings.fisher == "exact"
    assert set(report.distances_by_kind) == set(KINDS)
    assert report.distances_by_kind["exact"] == report.distances  # the deciding kind
    assert report.closest == report.closest_by_kind["exact"]
    assert report.closest_by_kind["empirical"] == closest_baseline(
        report.distances_by_kind["empirical"]
    )
    # The empirical distances are those of an independently trained probe of the same seed.
    s = dictionary.settings
    probe = train_probe(target, s.arch, epsilon=0.9, seed=3, config=s.train, head_width=10)
    reference = task_fim(probe, target, fisher="empirical", split="val")
    for name, d in report.distances_by_kind["empirical"].items():
        other = task_fim(dictionary.load_probe(name), target, fisher="empirical", split="val")
        assert d == pytest.approx(float(frechet_distance(reference, other)), rel=1e-12)
        assert 0.0 < d < 1.0


def test_distances_by_kind_trains_the_probe_once(
    dictionary: TaskDictionary, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = digit_tasks()[2]
    from fisher_fast.pipeline import distances_by_kind

    calls = _count_target_probes(monkeypatch, target)
    measured = distances_by_kind(target, dictionary, seed=1)
    assert calls == [1]
    assert list(measured.distances) == list(KINDS)  # the dictionary's kind first
    assert all(list(d) == dictionary.names() for d in measured.distances.values())
    assert set(measured.seconds) == set(KINDS)


def test_main_job_json_holds_both_kinds(main_job: MainJobResult) -> None:
    saved = json.loads(main_job.json_path.read_text())
    report = main_job.report
    chosen = saved["closest_baseline"]
    assert chosen["decided_by"] == "exact" and chosen["why"]
    assert set(chosen["by_kind"]) == set(KINDS)
    for kind in KINDS:
        entry = chosen["by_kind"][kind]
        assert list(entry["distances"]) == saved["baselines"]
        assert entry["closest"] == min(entry["distances"], key=entry["distances"].__getitem__)
    # the deciding kind's a* is the one Algorithm 1 searched from
    assert chosen["by_kind"]["exact"]["closest"] == chosen["closest"] == report.closest
    assert saved["algorithm1"]["closest"] == report.closest
    assert saved["table"][0]["method"] == f"FUSE in S_a* (closest baseline: {report.closest})"
    assert chosen["by_kind"]["exact"]["distances"] == pytest.approx(report.distances)
    assert saved["algorithm1"]["distances_by_kind"]["empirical"] == pytest.approx(
        chosen["by_kind"]["empirical"]["distances"]
    )
    assert saved["test_images"] == len(digit_tasks()[2].splits().test.y)
    assert saved["seeds"] == 1


def test_main_job_printout(main_job: MainJobResult) -> None:
    from fisher_fast.pipeline.table import GENOTYPE_LEGEND

    text = main_job.format()
    n = len(digit_tasks()[2].splits().test.y)
    assert main_job.test_images == n
    assert f"test accuracy on {n} test images, 1 seed (one image = " in text
    assert GENOTYPE_LEGEND in text
    assert "the exact Fisher decides (the dictionary's setting): " in text
    assert "d (exact Fisher)" in text and "d (empirical Fisher)" in text
    report = main_job.report
    assert f"a* = {report.closest} (exact: {report.closest}, empirical: " in text
    for row in main_job.rows:
        if row.genotype:
            assert f"  {row.method}: {row.genotype}" in text
    lines = text.splitlines()
    legend = lines.index(GENOTYPE_LEGEND)
    assert lines[legend + 1].startswith("  FUSE in S_a*")  # the legend heads the cells


def test_demo_prints_the_report(
    main_job: MainJobResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fisher_fast.cli import main
    from fisher_fast.commands import demo
    from fisher_fast.pipeline.table import GENOTYPE_LEGEND, format_test_size

    monkeypatch.setattr(demo, "run_main_job", lambda *args, **kwargs: main_job)
    assert main(["demo", "--out", str(tmp_path), "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert format_test_size(main_job.test_images) in printed
    assert GENOTYPE_LEGEND in printed
    assert "the exact Fisher decides" in printed and "d (empirical Fisher)" in printed


def test_demo_takes_the_embedded_suite_and_the_hand_designed_networks(
    main_job: MainJobResult, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fisher_fast.cli import main
    from fisher_fast.commands import demo

    calls: list[tuple[tuple, dict]] = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return main_job

    monkeypatch.setattr(demo, "run_main_job", record)
    monkeypatch.setattr(demo, "get_suite", lambda name: digits_suite_named(name))
    argv = ["demo", "--suite", "mnist5k", "--hand-designed", "mlp", "vgg16", "--quiet"]
    assert main(argv) == 0
    (suite, target, out), options = calls[0]
    assert suite.name == "mnist5k" and target == 2 and out == Path("runs", "demo-mnist5k")
    assert options["hand_designed"] == ["mlp", "vgg16"]
    assert "Algorithm 1 on the embedded mnist5k" in capsys.readouterr().out
    assert main(["demo", "--quiet"]) == 0 and calls[1][0][2] == Path("runs", "demo")
    assert calls[1][1]["hand_designed"] == ["mlp", "cnn", "resnet"]


def digits_suite_named(name: str):
    """The digits suite under another name (the demo's choice of suite, without its data)."""
    return replace(digits_suite(), name=name)


def test_main_job_refuses_an_unknown_hand_designed_network(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hand-designed architectures \\['vgg19'\\]"):
        run_main_job(digits_suite(), 2, tmp_path, hand_designed=["mlp", "vgg19"])


def test_table_header_and_legend_format() -> None:
    from fisher_fast.pipeline.table import GENOTYPE_LEGEND, format_genotypes, format_test_size

    rows = [
        Row("FUSE", 0.5, 1000, 2.0, "|conv_3x3~0|+|identity~0|zero~1|"),
        Row("hand-designed mlp", 0.25, 2000, 0.0, ""),
    ]
    table = format_table(rows, test_images=360, seeds=1)
    assert table.splitlines()[0] == "test accuracy on 360 test images, 1 seed (one image = 0.28%)"
    assert format_table(rows).splitlines()[0].startswith("method")  # unchanged without a size
    assert (
        format_test_size(1000, 3) == "test accuracy on 1000 test images, 3 seeds (one image = 0.1%)"
    )
    with pytest.raises(ValueError):
        format_test_size(0)
    assert format_genotypes(rows).splitlines() == [
        GENOTYPE_LEGEND,
        "  FUSE: |conv_3x3~0|+|identity~0|zero~1|",
    ]
    assert format_genotypes(rows[1:]) == ""
