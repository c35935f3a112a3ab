"""The training pieces shared by tasks and searches: :func:`evaluate` against a hand computation
and the keep-best rule of :class:`KeepBest` (strictly greater wins, the earlier on ties)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fisher_fast.part import Part
from fisher_fast.training import KeepBest, evaluate


def test_keep_best_takes_only_strictly_greater_scores() -> None:
    best = KeepBest()
    offers = [
        ((0.5, -1.0), 1, True),  # the first offer is always taken
        ((0.7, -2.0), 2, True),  # higher accuracy
        ((0.7, -2.0), 3, False),  # a tie: the earlier candidate stays
        ((0.7, -1.5), 4, True),  # same accuracy, lower loss
        ((0.6, 0.0), 5, False),  # lower accuracy, whatever the loss
    ]
    for score, index, taken in offers:
        assert best.offer(score, index) is taken
    assert best.score == (0.7, -1.5) and best.index == 4


def test_keep_best_without_offers_keeps_its_initial_index_and_the_model() -> None:
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = KeepBest(model, index=7)
    best.restore()
    assert best.score is None and best.index == 7
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    KeepBest().restore()  # no model: nothing to restore


def test_keep_best_restores_a_copy_of_the_best_state() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    weight, running_mean = model[0].weight, model[1].running_mean

    def set_state(value: float) -> None:
        with torch.no_grad():  # in place: a kept alias would change along
            weight.fill_(value)
            running_mean.fill_(value)

    best = KeepBest(model)
    set_state(1.0)
    best.offer((1.0,), 0)
    set_state(2.0)
    best.offer((1.0,), 1)  # a tie: the state of candidate 0 stays
    set_state(3.0)
    best.offer((0.5,), 2)
    set_state(4.0)
    best.restore()
    assert best.index == 0
    assert torch.equal(weight, torch.ones_like(weight))
    assert torch.equal(running_mean, torch.ones_like(running_mean))


class ModeRecorder(nn.Module):
    """The identity map on logits, recording whether each call ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_matches_a_hand_computation_in_eval_mode(training: bool) -> None:
    # logits are the inputs: [2, 0] -> 0 and [0, 1] -> 1 are right, [1, 3] with label 0 is wrong
    part = Part(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]]), torch.tensor([0, 1, 0]))
    model = ModeRecorder().train(training)
    accuracy, loss = evaluate(model, part, "cpu", batch_size=2)  # batches of 2 and 1 samples
    # cross-entropy of logits l and label y: log(sum_j exp(l_j)) - l_y
    hand = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(1 + math.exp(2))]
    assert accuracy == pytest.approx(2 / 3)
    assert loss == pytest.approx(sum(hand) / 3)
    assert model.modes == [False, False] and model.training is training
