"""Probe shapes for every architecture, per-layer FIM coverage, seeding, and train_probe."""

from __future__ import annotations

import warnings

import pytest
import torch
from task_files import blob_source

import fisher_fast
from fisher_fast.tasks import PROBES, EpsilonWarning, Task, TrainConfig, make_probe, train_probe
from fisher_fast.tasks.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", list(PROBES))
def test_every_probe_maps_a_tiny_batch_to_head_logits(
    arch: str, shape: tuple[int, int, int]
) -> None:
    model = make_probe(arch, shape, 7, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list(PROBES))
def test_every_probe_layer_has_a_fim_rule(arch: str) -> None:
    model = make_probe(arch, (1, 8, 8), 3, seed=0).eval()
    fim = fisher_fast.diag_fim(
        model,
        (torch.randn(2, 1, 8, 8), torch.tensor([0, 2])),
        on_unsupported="error",
        progress=False,
    )
    assert fim.flat.numel() == sum(p.numel() for p in model.parameters())


def test_seeded_probes_are_reproducible_and_leave_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = make_probe("cnn", (1, 8, 8), 4, seed=3), make_probe("cnn", (1, 8, 8), 4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(
        next(iter(make_probe("cnn", (1, 8, 8), 4, seed=4).parameters())), next(iter(a.parameters()))
    )


def test_probe_errors() -> None:
    with pytest.raises(
        ValueError, match="unknown probe architecture 'vit'; choose one of mlp, cnn"
    ):
        make_probe("vit", (1, 8, 8), 2)
    with pytest.raises(ValueError, match=r"takes images \(C, H, W\)"):
        make_probe("resnet", (64,), 2)
    assert make_probe("mlp", (64,), 2)(torch.randn(3, 64)).shape == (3, 2)


def test_train_probe_reaches_epsilon_and_is_deterministic() -> None:
    task = Task("c0-c1-c2", blob_source(), [0, 1, 2], other=True)
    config = TrainConfig(epochs=15, batch_size=16, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EpsilonWarning)
        probe = train_probe(task, "mlp", epsilon=0.1, seed=1, config=config, head_width=6)
    assert probe.reached and probe.test_accuracy >= 0.9 and 1 <= probe.best_epoch <= 15
    assert probe.model(task.splits().test.x).shape[1] == 6 and not probe.model.training
    again = train_probe(task, "mlp", epsilon=0.1, seed=1, config=config, head_width=6)
    assert all(
        torch.equal(p, q)
        for p, q in zip(probe.model.parameters(), again.model.parameters(), strict=True)
    )


def test_train_probe_warns_when_it_is_not_an_epsilon_approximation() -> None:
    task = Task("all", blob_source(), [0, 1, 2, 3])
    with pytest.warns(EpsilonWarning, match="is not an ε-approximation network"):
        probe = train_probe(
            task, "cnn", epsilon=1e-6, seed=0, config=TrainConfig(epochs=1, lr=1e-5)
        )
    assert not probe.reached
    with pytest.raises(ValueError, match="head_width 2 is smaller"):
        train_probe(task, "mlp", head_width=2)


def test_fit_keeps_the_earliest_best_epoch_and_its_weights() -> None:
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    config = TrainConfig(epochs=4, batch_size=4, lr=0.1)
    model = torch.nn.Linear(3, 2)
    loss = torch.nn.functional.cross_entropy
    assert fit(model, config, x, y, loss, seed=0, device="cpu") == config.epochs  # no score
    scores, weights = iter([(1.0,), (3.0,), (3.0,), (2.0,)]), []

    def score() -> tuple[float, ...]:
        weights.append(model.weight.detach().clone())
        return next(scores)

    assert fit(model, config, x, y, loss, seed=0, device="cpu", score=score) == 2
    assert torch.equal(model.weight, weights[1]) and not torch.equal(weights[1], weights[2])
