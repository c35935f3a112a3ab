"""Finiteness and label checks read every few batches (as on a GPU, where each read is a host
sync) still name the first bad batch and layer, exactly as the per-batch checks of the CPU do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_models import SqrtHead
from torch import nn

import fisher_fast
from fisher_fast.fim import finite_guard
from fisher_fast.fim.finite_guard import DEFERRED_BATCHES, FiniteGuard
from fisher_fast.fim.losses import LabelCheck, objectives


def test_the_cpu_reads_at_once_and_an_accelerator_defers() -> None:
    assert FiniteGuard(torch.device("cpu")).every == 1
    assert FiniteGuard(torch.device("cuda")).every == DEFERRED_BATCHES > 1


def test_a_deferred_flag_raises_when_read_naming_its_batch() -> None:
    guard = FiniteGuard(torch.device("cuda"))  # only its schedule: the tensors stay on the CPU
    acc = torch.ones(3)
    for k in range(DEFERRED_BATCHES - 1):
        loss = torch.tensor(float("nan") if k in (2, 4) else 1.0)
        guard.loss(loss, f"batch {k}")
        guard.batch(acc, {}, [], f"batch {k}")  # not read yet: no error
    guard.loss(torch.tensor(1.0), "last")
    with pytest.raises(FloatingPointError, match=r"loss is not finite \(nan\).* batch 2;"):
        guard.batch(acc, {}, [], "last")
    assert guard.pending == []


def test_a_flush_with_nothing_flagged_passes() -> None:
    guard = FiniteGuard(torch.device("cuda"))
    guard.loss(torch.tensor(2.0), "0..3")
    guard.batch(torch.zeros(4), {}, [], "0..3")
    guard.flush({})
    assert guard.pending == []


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """diag_fim on the CPU with the accelerator's schedule of reads."""
    monkeypatch.setattr(finite_guard, "batches_between_reads", lambda device: DEFERRED_BATCHES)


@pytest.mark.usefixtures("deferred")
def test_diag_fim_names_the_first_non_finite_loss(gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    x[9, 1] = float("nan")  # batch 2 of 5 (samples 8..11); read only after the last batch
    with pytest.raises(FloatingPointError, match=r"loss is not finite .* samples 8\.\.11;"):
        fisher_fast.diag_fim(model, (x, y), batch_size=4, progress=False)


@pytest.mark.usefixtures("deferred")
def test_diag_fim_names_the_layer_whose_gradient_was_not_finite(gen: torch.Generator) -> None:
    model = SqrtHead()
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    with torch.no_grad():
        model.body.weight[0].zero_()
        model.body.bias[0] = 0.0
    with pytest.raises(
        FloatingPointError, match=r"output of body \(Linear\) is not finite on samples 0\.\.3:"
    ):
        fisher_fast.diag_fim(model, (x, y), batch_size=4, progress=False)


@pytest.mark.usefixtures("deferred")
def test_deferred_reads_give_the_same_fim(gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    deferred = fisher_fast.diag_fim(model, (x, y), batch_size=4, progress=False)
    guard = FiniteGuard(torch.device("cpu"))
    assert guard.every == DEFERRED_BATCHES  # the fixture's schedule is in force
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finite_guard, "batches_between_reads", lambda device: 1)
        at_once = fisher_fast.diag_fim(model, (x, y), batch_size=4, progress=False)
    assert torch.equal(deferred.flat, at_once.flat)


@pytest.mark.usefixtures("deferred")
@pytest.mark.parametrize("bad", [3, -1, -100], ids=["past-the-classes", "negative", "ignore-index"])
def test_a_label_outside_the_classes_raises_before_diag_fim_returns(
    bad: int, gen: torch.Generator
) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    y[8:12] = torch.tensor([0, bad, 2, 1])  # batch 2 of 5; read only after the last batch
    low, high = min(0, bad), max(2, bad)
    with pytest.raises(
        ValueError,
        match=rf"labels must lie in \[0, 3\) .* from {low} to {high} on the batch of samples 8\.\.11\.",
    ):
        fisher_fast.diag_fim(model, (x, y), batch_size=4, progress=False)


def test_deferred_labels_are_handed_over_and_clamped_into_range() -> None:
    """Nothing indexes out of range before the check is read (on CUDA that is a device assert)."""
    logits = torch.randn(3, 3)
    checks: list[LabelCheck] = []
    (objective,) = objectives(
        logits, torch.tensor([0, 5, -1]), "cross_entropy", "empirical", 1, None, checks.append
    )
    expected = F.cross_entropy(logits, torch.tensor([0, 2, 0]), reduction="sum")
    assert torch.equal(objective, expected)
    (check,) = checks
    assert bool(check.outside)
    with pytest.raises(
        ValueError, match=r"\[0, 3\) .* from -1 to 5 on the batch of samples 0\.\.2\."
    ):
        raise check.error("0..2")
    list(
        objectives(
            logits, torch.tensor([0, 2, 1]), "cross_entropy", "empirical", 1, None, checks.append
        )
    )
    assert not bool(checks[-1].outside)
