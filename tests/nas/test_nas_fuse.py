"""FUSE: the softmax(α) mixture, picking the better candidate, determinism, budgets, and the
test split kept out of the search."""

from __future__ import annotations

import copy
import inspect
from dataclasses import replace

import pytest
import torch
from nas_search_helpers import SHAPE, THREE_OPS, TINY, TWO_CELLS, only_good, toy_part
from torch import nn

from fisher_fast.nas import (
    FuseConfig,
    Genotype,
    Mixture,
    fuse_search,
    random_search,
    train_and_evaluate,
)
from fisher_fast.nas.fuse import _optimise
from fisher_fast.nas.training import build_seeded, carve_validation, train_steps
from fisher_fast.tasks import Part

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


class Constant(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_mixture_weighs_outputs_by_softmax_alpha() -> None:
    mixture = Mixture([Constant([1.0, 0.0]), Constant([0.0, 3.0])])
    x = torch.zeros(2, 1, 4, 4)
    assert torch.allclose(mixture(x), torch.tensor([[0.5, 1.5], [0.5, 1.5]]))
    with torch.no_grad():
        mixture.alpha.copy_(torch.tensor([0.0, torch.log(torch.tensor(3.0))]))
    assert torch.allclose(mixture.probabilities(), torch.tensor([0.25, 0.75]))
    assert torch.allclose(mixture(x), torch.tensor([[0.25, 2.25]]).expand(2, -1))
    assert mixture.weights() == []


@pytest.mark.parametrize("good_op", ["identity", "conv_3x3"])
def test_fuse_picks_the_clearly_better_candidate(good_op: str) -> None:
    good = Genotype(3, ("zero", good_op, "zero"))
    result = fuse_search(
        TWO_CELLS,
        toy_part(64, seed=0),
        num_classes=2,
        generator=torch.Generator().manual_seed(0),
        config=TINY,
        build=only_good(good),
    )
    assert result.genotype == good
    for round_ in result.history:
        assert set(round_.candidates) == set(TWO_CELLS)
        assert round_.candidates[round_.winner] == good
        assert round_.alphas[round_.winner] > 0.6
    assert result.history[1].candidates[0] == good  # the incumbent is carried over, first


def test_fuse_is_deterministic_for_a_seed() -> None:
    config = replace(TINY, candidates=2)
    data = toy_part(48, seed=1)

    def run(seed: int) -> tuple:
        r = fuse_search(
            THREE_OPS,
            data,
            num_classes=2,
            generator=torch.Generator().manual_seed(seed),
            config=config,
        )
        return r.genotype, r.history, r.alphas, r.steps

    first = run(3)
    assert run(3) == first
    assert len(first[1][0].candidates) == 3 and len(set(first[1][0].candidates)) == 3


def test_alpha_convergence_and_budgets() -> None:
    data = toy_part(48, seed=2)
    loose = replace(TINY, tol=1.0, rounds=3)  # softmax weights never move by 1: converged
    result = fuse_search(
        THREE_OPS, data, num_classes=2, generator=torch.Generator().manual_seed(0), config=loose
    )
    assert len(result.history) == 3
    assert all(r.converged and r.steps == loose.check_every for r in result.history)
    assert result.steps == 3 * 2 * loose.check_every  # rounds x (C + 1) networks x steps
    strict = replace(TINY, tol=1e-12, rounds=5, time_budget_s=1e-9)
    result = fuse_search(
        THREE_OPS, data, num_classes=2, generator=torch.Generator().manual_seed(0), config=strict
    )
    assert len(result.history) == 1  # the wall-time budget stops after the first round
    assert not result.history[0].converged and result.history[0].steps == strict.max_steps


def test_searches_take_no_test_split() -> None:
    for search in (fuse_search, random_search):
        assert not any("test" in name for name in inspect.signature(search).parameters)


def test_validation_split_is_carved_from_training_data() -> None:
    data = toy_part(40, seed=3)
    fit, val = carve_validation(data, 0.25, torch.Generator().manual_seed(0))
    assert len(fit) == 30 and len(val) == 10 and int(val.y.sum()) == 5
    rows = {tuple(row.tolist()) for row in torch.cat([fit.x, val.x]).flatten(1)}
    assert rows == {tuple(row.tolist()) for row in data.x.flatten(1)}
    with pytest.raises(ValueError, match="validation fraction"):
        carve_validation(data, 1.0, torch.Generator())


def test_poisoned_test_split_changes_only_the_test_accuracy() -> None:
    train, test = toy_part(48, seed=4), toy_part(32, seed=5)
    poisoned = Part(test.x, 1 - test.y)  # every test label flipped

    def pipeline(test_part: Part) -> tuple:
        g = torch.Generator().manual_seed(7)
        found = fuse_search(THREE_OPS, train, num_classes=2, generator=g, config=TINY)
        final = train_and_evaluate(
            found.genotype, train, test_part, num_classes=2, steps=20, generator=g, config=TINY
        )
        return found.genotype, found.alphas, final

    cell, alphas, clean = pipeline(test)
    cell_p, alphas_p, dirty = pipeline(poisoned)
    assert (cell_p, alphas_p, dirty.parameters) == (cell, alphas, clean.parameters)
    # flipped binary labels: the same trained network scores exactly 1 - its clean accuracy
    assert dirty.test_accuracy == pytest.approx(1.0 - clean.test_accuracy)
    assert clean.test_accuracy > 0.9


def test_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="candidates"):
        FuseConfig(candidates=0)
    with pytest.raises(ValueError, match="alpha_lr"):
        FuseConfig(alpha_lr=0.0)


def test_final_training_tests_the_best_validation_state() -> None:
    """Scoring on a validation split does not change the training trajectory, so when that split
    is the test split itself, the state it picks tests at least as well as the last one."""
    train, test = toy_part(48, seed=6), toy_part(32, seed=7)
    cell = next(iter(THREE_OPS))

    def final(val: Part | None) -> float:
        g = torch.Generator().manual_seed(3)
        return train_and_evaluate(
            cell, train, test, num_classes=2, steps=12, generator=g, config=TINY,
            val_data=val, check_every=2,
        ).test_accuracy  # fmt: skip

    last, best = final(None), final(test)
    assert best >= last
    with pytest.raises(ValueError, match="check_every"):
        train_and_evaluate(
            cell, train, test, num_classes=2, steps=5, generator=torch.Generator(), check_every=0
        )


def test_the_alpha_step_leaves_the_batchnorm_running_statistics_alone() -> None:
    """One weight step then one α step on a validation batch unlike the training data: the
    running statistics must be those of the weight step alone (before, they absorbed the
    validation batch); α moved, so the α step did run."""
    build = TINY.skeleton.builder(SHAPE, 2)
    cells = [
        Genotype(3, ("conv_3x3", "identity", "zero")),
        Genotype(3, ("zero", "conv_3x3", "zero")),
    ]
    mixture = Mixture([build_seeded(build, g, seed) for seed, g in enumerate(cells)])
    twin = copy.deepcopy(mixture)
    train = toy_part(16, seed=0)
    val = Part(toy_part(16, seed=1).x * 10 + 5, toy_part(16, seed=1).y)
    config = replace(TINY, max_steps=1, check_every=100)
    assert _optimise(mixture, iter([train]), iter([val]), config) == (1, False)
    train_steps(twin, iter([train]), 1, torch.optim.Adam(twin.weights(), lr=config.weight_lr))
    buffers = dict(twin.named_buffers())
    assert buffers and any("running_mean" in name for name in buffers)
    for name, value in mixture.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert not torch.equal(mixture.alpha, twin.alpha)
    assert all(m.track_running_stats for m in mixture.modules() if isinstance(m, nn.BatchNorm2d))
