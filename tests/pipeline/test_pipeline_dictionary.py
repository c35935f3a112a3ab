"""The task dictionary: round trip, resumable build, and every way it refuses bad input without
overwriting anything."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_SETTINGS, digit_tasks

from fisher_fast.nas import SearchSpace
from fisher_fast.pipeline import DictionaryError, TaskDictionary, build_dictionary
from fisher_fast.pipeline.dictionary import INDEX_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dictionary of digits tasks 0 and 1, built once for the module (tests copy it)."""
    root = tmp_path_factory.mktemp("dict") / "d"
    tasks = digit_tasks()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests, which retrain a probe and expect equal weights
    try:
        build_dictionary(root, [tasks[0], tasks[1]], TINY_SETTINGS, seed=3, progress=False)
    finally:
        torch.set_num_threads(before)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_round_trip(built: Path) -> None:
    d = TaskDictionary.open(built)
    assert d.names() == ["detect 0", "detect 6"]
    assert d.settings == TINY_SETTINGS
    full = SearchSpace.full(TINY_SETTINGS.nodes)
    for baseline in d:
        assert baseline.genotype in full
        assert len(baseline.search["rounds"]) == TINY_SETTINGS.fuse.rounds
        model = d.load_probe(baseline.task)
        assert model(torch.zeros(3, 1, 8, 8)).shape == (3, TINY_SETTINGS.head_width)
    # Baselines searched with one run seed still draw different candidates (seed per task).
    first, second = (b.search["rounds"][0]["candidates"] for b in d)
    assert first != second


def test_probe_weights_are_the_trained_ones(built: Path, tmp_path: Path) -> None:
    from fisher_fast.tasks import train_probe

    d = TaskDictionary.open(built)
    s = TINY_SETTINGS
    again = train_probe(
        digit_tasks()[0], s.arch, epsilon=s.epsilon, seed=3, config=s.train, head_width=10
    )
    stored = d.load_probe("detect 0").state_dict()
    for name, value in again.model.state_dict().items():
        assert torch.equal(stored[name], value), name


def test_build_completes_and_keeps_existing_entries(built: Path, tmp_path: Path) -> None:
    root = _copy(built, tmp_path / "d")
    probe = root / TaskDictionary.open(root)["detect 0"].probe_file
    before = probe.read_bytes(), probe.stat().st_mtime_ns
    tasks = digit_tasks()
    d = build_dictionary(root, [tasks[0], tasks[1], tasks[2]], TINY_SETTINGS, progress=False)
    assert d.names() == ["detect 0", "detect 6", "0-3 + other"]
    assert (probe.read_bytes(), probe.stat().st_mtime_ns) == before
    assert TaskDictionary.open(root).names() == d.names()


def test_incompatible_settings_are_refused(built: Path) -> None:
    other = replace(TINY_SETTINGS, nodes=4)
    with pytest.raises(DictionaryError, match="nodes"):
        build_dictionary(built, digit_tasks()[:1], other, progress=False)


def test_adding_an_existing_task_is_refused(built: Path) -> None:
    with pytest.raises(DictionaryError, match="already has a baseline 'detect 0'"):
        TaskDictionary.open(built).add(digit_tasks()[0])
    with pytest.raises(DictionaryError, match="already holds a task dictionary"):
        TaskDictionary.create(built, TINY_SETTINGS)


def test_a_task_of_another_shape_is_refused(tmp_path: Path) -> None:
    d = TaskDictionary.create(tmp_path / "d", replace(TINY_SETTINGS, input_shape=(3, 8, 8)))
    with pytest.raises(DictionaryError, match="does not fit"):
        d.add(digit_tasks()[0])


def _unchanged_after(root: Path, error: str) -> None:
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(DictionaryError, match=error):
        TaskDictionary.open(root)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files


def test_a_damaged_probe_is_detected(built: Path, tmp_path: Path) -> None:
    root = _copy(built, tmp_path / "d")
    probe = root / TaskDictionary.open(root)["detect 6"].probe_file
    data = bytearray(probe.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's bytes
    probe.write_bytes(bytes(data))
    _unchanged_after(root, "does not match its checksum")
    probe.write_bytes(b"not a safetensors file")
    _unchanged_after(root, "cannot be read")
    probe.unlink()
    _unchanged_after(root, "cannot be read")


def test_a_damaged_index_is_detected(built: Path, tmp_path: Path) -> None:
    root = _copy(built, tmp_path / "d")
    index = root / INDEX_FILE
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    _unchanged_after(root, "not a readable task dictionary")
    data = json.loads(text)
    data["tasks"][0]["genotype"] = "|nonsense~0|"
    index.write_text(json.dumps(data))
    _unchanged_after(root, "malformed field")


def test_a_newer_or_foreign_dictionary_is_refused(built: Path, tmp_path: Path) -> None:
    root = _copy(built, tmp_path / "d")
    index = root / INDEX_FILE
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "version": 99}))
    _unchanged_after(root, "format version 99")
    index.write_text(json.dumps({**data, "format": "something else"}))
    _unchanged_after(root, "is not a task dictionary")
    with pytest.raises(DictionaryError, match="build one with"):
        TaskDictionary.open(tmp_path / "nothing here")
