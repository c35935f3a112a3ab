"""Resumable FUSE: an interrupted search continues from its last finished round and ends as an
uninterrupted one; a checkpoint of another search, or a damaged one, is refused untouched."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from nas_search_helpers import THREE_OPS, TINY, toy_part

from fisher_fast.nas import Round, SearchResult, fuse_search

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

CONFIG = replace(TINY, candidates=2, rounds=4)
DATA = toy_part(48, seed=5)


class Interrupt(Exception):
    """Stands for a killed process."""


def _search(seed: int = 7, checkpoint: Path | None = None, **kwargs: object) -> SearchResult:
    config = kwargs.pop("config", CONFIG)
    return fuse_search(
        THREE_OPS,
        DATA,
        num_classes=2,
        generator=torch.Generator().manual_seed(seed),
        config=config,  # type: ignore[arg-type]
        checkpoint=checkpoint,
        **kwargs,  # type: ignore[arg-type]
    )


def _same(a: SearchResult, b: SearchResult) -> None:
    assert (a.genotype, a.history, a.alphas, a.steps) == (b.genotype, b.history, b.alphas, b.steps)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    tmp_path: Path, stop_after: int
) -> None:
    reference = _search()
    path = tmp_path / "fuse.json"
    finished: list[Round] = []

    def crash(r: Round) -> None:
        finished.append(r)
        if len(finished) == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        _search(checkpoint=path, on_round=crash)
    assert len(json.loads(path.read_text())["rounds"]) == stop_after
    resumed_rounds: list[Round] = []
    resumed = _search(checkpoint=path, on_round=resumed_rounds.append)
    assert len(resumed_rounds) == CONFIG.rounds - stop_after  # finished rounds are not rerun
    _same(resumed, reference)
    _same(_search(checkpoint=path), reference)  # a finished search only reloads


def test_a_search_can_be_extended_by_more_rounds(tmp_path: Path) -> None:
    """Only the added rounds run (the two saved ones are reloaded), and the result equals an
    uninterrupted search of all rounds."""
    path = tmp_path / "fuse.json"
    _search(checkpoint=path, config=replace(CONFIG, rounds=2))
    extended_rounds: list[Round] = []
    extended = _search(checkpoint=path, on_round=extended_rounds.append)
    assert len(extended_rounds) == CONFIG.rounds - 2
    _same(extended, _search())


def test_a_checkpoint_of_another_search_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fuse.json"
    _search(checkpoint=path, config=replace(CONFIG, rounds=1))
    text = path.read_text()
    with pytest.raises(ValueError, match="belongs to another search"):
        _search(seed=8, checkpoint=path)
    with pytest.raises(ValueError, match="belongs to another search"):
        _search(checkpoint=path, config=replace(CONFIG, weight_lr=0.5))
    assert path.read_text() == text


def test_a_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fuse.json"
    _search(checkpoint=path, config=replace(CONFIG, rounds=1))
    damaged = path.read_text()[:-40]
    path.write_text(damaged)
    with pytest.raises(ValueError, match="is unreadable"):
        _search(checkpoint=path)
    assert path.read_text() == damaged
