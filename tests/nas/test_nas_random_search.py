"""Random search: the same budget as FUSE in candidate-steps, distinct cells, determinism, and
picking the better cell by validation accuracy."""

from __future__ import annotations

import pytest
import torch
from nas_search_helpers import SHAPE, THREE_OPS, TINY, TWO_CELLS, only_good, toy_part

from fisher_fast.nas import (
    Genotype,
    Network,
    SearchSpace,
    fuse_search,
    random_search,
    train_and_evaluate,
)
from fisher_fast.nas.random_search import trial_steps

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


CHAIN_OF_TWO = SearchSpace(3, ["identity", "conv_3x3"], structure=[(0, 1), (1, 2)])
"""4 cells, 4 distinct: node 1 = op(input), node 2 = op(node 1)."""
FORK_OF_TWO = SearchSpace(3, ["identity", "conv_3x3"], structure=[(0, 2), (1, 2)])
"""4 cells but 2 distinct: node 1 is zero, so the edge from it does not count."""


@pytest.mark.parametrize(("space", "distinct"), [(CHAIN_OF_TWO, 4), (FORK_OF_TWO, 2)])
def test_random_search_in_a_space_of_four_spreads_the_budget_over_every_cell(
    space: SearchSpace, distinct: int
) -> None:
    assert space.size == 4
    budget = 16 * TINY.max_steps + 2  # asks for 17 trials; the space holds `distinct` cells
    result = random_search(
        space,
        toy_part(48, seed=0),
        num_classes=2,
        budget=budget,
        generator=torch.Generator().manual_seed(0),
        config=TINY,
    )
    cells = [r.candidates[0] for r in result.history]
    assert len(cells) == distinct and {c.canonical() for c in cells} == {
        g.canonical() for g in space
    }
    share, extra = divmod(budget, distinct)
    assert [r.steps for r in result.history] == [share + 1] * extra + [share] * (distinct - extra)
    assert result.steps == budget


def test_trial_steps_keep_the_budget() -> None:
    assert trial_steps(45, 20, 3) == [20, 20, 5]  # enough trials: the last one is shorter
    assert trial_steps(45, 20, 2) == [23, 22]  # too few cells: spread evenly
    assert trial_steps(7, 20, 1) == [7]


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
