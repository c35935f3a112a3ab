"""Random search: the same budget as FUSE in candidate-steps, distinct cells, determinism, and
picking the better cell by validation accuracy."""

from __future__ import annotations

import pytest
import torch
from nas_search_helpers import SHAPE, THREE_OPS, TINY, TWO_CELLS, only_good, toy_part

from fisher_fast.nas import Genotype, Network, fuse_search, random_search, train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def test_random_search_spends_exactly_the_fuse_budget() -> None:
    data = toy_part(48, seed=0)
    fuse = fuse_search(
        THREE_OPS, data, num_classes=2, generator=torch.Generator().manual_seed(0), config=TINY
    )
    budget = fuse.steps + 7  # not a multiple of the steps per trial: the last trial is shorter
    result = random_search(
        THREE_OPS,
        data,
        num_classes=2,
        budget=budget,
        generator=torch.Generator().manual_seed(0),
        config=TINY,
    )
    assert result.steps == budget
    assert [r.steps for r in result.history][-1] == budget % TINY.max_steps
    assert all(r.steps == TINY.max_steps for r in result.history[:-1])
    cells = [r.candidates[0] for r in result.history]
    assert len({c.canonical() for c in cells}) == len(cells)
    assert result.alphas == tuple(r.val_accuracy for r in result.history)
    best = max(result.alphas)  # ties are broken by validation loss
    assert result.genotype in {c for c, a in zip(cells, result.alphas, strict=True) if a == best}


def test_random_search_is_deterministic_and_picks_the_better_cell() -> None:
    good = Genotype(3, ("zero", "conv_3x3", "zero"))

    def run() -> tuple:
        r = random_search(
            TWO_CELLS,
            toy_part(48, seed=1),
            num_classes=2,
            budget=2 * TINY.max_steps,
            generator=torch.Generator().manual_seed(5),
            config=TINY,
            build=only_good(good),
        )
        return r.genotype, r.history, r.alphas

    first = run()
    assert run() == first
    assert first[0] == good


def test_random_search_rejects_an_empty_budget() -> None:
    with pytest.raises(ValueError, match="budget"):
        random_search(
            THREE_OPS, toy_part(8, 0), num_classes=2, budget=0, generator=torch.Generator()
        )


def test_train_and_evaluate_reports_the_network_size() -> None:
    cell = Genotype(3, ("conv_3x3", "identity", "zero"))
    result = train_and_evaluate(
        cell,
        toy_part(48, seed=2),
        toy_part(16, seed=3),
        num_classes=2,
        steps=5,
        generator=torch.Generator().manual_seed(0),
        config=TINY,
    )
    expected = Network(cell, SHAPE, 2, channels=2, stages=1).num_parameters
    assert result.parameters == expected
    assert 0.0 <= result.test_accuracy <= 1.0 and result.seconds > 0
