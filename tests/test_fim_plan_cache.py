"""A later diag_fim call on the same model starts from the plan the last one ended with
(fisher_fast/fim/plan_cache.py), checked as every later batch is, and planned anew whenever
the model or the batch's layouts changed.

Each call is compared with the float64 per-sample loop on fresh data; the number of plans made
(``make_plan`` calls) shows whether the kept plan was used.
"""

from __future__ import annotations

import gc
import random
import types
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from call_counter import CallCounter
from fim_reference import max_relative_error, reference_fim_batches
from layer_models import RoutedExperts
from torch import nn

import fisher_fast
from fisher_fast.fim import engine, plan_cache
from fisher_fast.fim.rules import register_rule

VOCAB, T, D, CLASSES, N = 12, 5, 8, 3, 4


class _Tokens(nn.Module):
    """Token and position embeddings (ids (1, T) shared by all samples, so broadcast), a class
    token held by the model itself and broadcast in its forward, a LayerNorm and a head: the
    kept plan carries an expanded Embedding and a broadcast parameter of the root module."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, D), nn.Embedding(T + 3, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(ids.shape[1])[None]
        h = self.tokens(ids) + self.positions(steps)
        h = torch.cat([self.cls.expand(len(ids), -1, -1), h], dim=1)
        return self.head(torch.tanh(self.norm(h)).mean(1))


def _data(count: int, length: int = T) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randint(0, VOCAB, (N, length)), torch.randint(0, CLASSES, (N,)))
        for _ in range(count)
    ]


def _exact(model: nn.Module, data: list, **kwargs: object) -> fisher_fast.DiagFIM:
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    return fim


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> CallCounter:
    """Counts the plans diag_fim makes; every test starts with no kept plan."""
    plan_cache.forget()
    return CallCounter(monkeypatch, engine, "make_plan")


def test_a_second_call_reuses_the_plan_and_stays_exact(plans: CallCounter) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _Tokens().double().eval()
    first = _exact(model, _data(2))
    assert plans.calls == 1
    paths = first.meta["paths"]
    assert "expanded" in paths["positions.weight"] and "broadcast" in paths["cls"], paths
    second = _exact(model, _data(3))
    assert plans.calls == 1, "the second call planned again"
    assert second.meta["paths"] == paths
    assert not model.positions._forward_hooks and not model._forward_pre_hooks


def test_the_kept_plan_gives_the_fresh_plans_numbers(plans: CallCounter) -> None:
    torch.manual_seed(random.randrange(2**31))
    model, data = _Tokens().eval(), _data(2)
    fisher_fast.diag_fim(model, _data(1), progress=False)
    kept = fisher_fast.diag_fim(model, data, progress=False)
    fresh = fisher_fast.diag_fim(model, data, progress=False, reuse_plan=False)
    assert plans.calls == 2
    assert torch.equal(kept.flat, fresh.flat)


def test_reuse_plan_false_plans_again(plans: CallCounter) -> None:
    model = _Tokens().double().eval()
    _exact(model, _data(1))
    _exact(model, _data(1), reuse_plan=False)
    assert plans.calls == 2


def test_a_batch_of_other_layouts_is_planned_anew(plans: CallCounter) -> None:
    """Another sequence length changes the shared position ids' shape: the kept plan does not
    conform, so the first batch is planned again, and stays exact."""
    torch.manual_seed(random.randrange(2**31))
    model = _Tokens().double().eval()
    _exact(model, _data(1))
    _exact(model, _data(2, length=T + 2))
    assert plans.calls == 2


def _freeze_norm(model: _Tokens) -> None:
    model.norm.weight.requires_grad_(False)


def _new_head(model: _Tokens) -> None:
    model.head = nn.Linear(D, CLASSES).double()


def _hooked(model: _Tokens) -> None:
    model.norm.register_forward_hook(lambda m, a, out: out * 2.0)


def _first_feature_only(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.Linear.forward(self, x[:, :1].expand_as(x))


def _own_forward(model: _Tokens) -> None:
    model.head.forward = types.MethodType(_first_feature_only, model.head)  # type: ignore[method-assign]


def _train_mode(model: _Tokens) -> None:
    model.train()


class _Halved(nn.Module):
    """A module the test registers a rule for after the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(D, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


CHANGES: dict[str, Callable[[_Tokens], None]] = {
    "requires_grad": _freeze_norm,
    "replaced_module": _new_head,
    "forward_hook": _hooked,
    "instance_forward": _own_forward,
    "training_flag": _train_mode,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_model_is_planned_anew(change: str, plans: CallCounter) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _Tokens().double().eval()
    _exact(model, _data(1))
    CHANGES[change](model)
    mode = "keep" if change == "training_flag" else "eval"
    fim = fisher_fast.diag_fim(model, _data(1), progress=False, mode=mode)
    assert plans.calls == 2
    if change == "requires_grad":
        assert "norm.weight" not in fim.names
    else:
        model.eval()
        _exact(model, _data(2))


@pytest.mark.usefixtures("rule_registry")
def test_a_rule_registered_after_a_call_is_used_by_the_next(plans: CallCounter) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = nn.Sequential(nn.Linear(D, D), _Halved(), nn.Linear(D, CLASSES)).double().eval()
    data = [(torch.randn(N, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,)))]
    before = _exact(model, data).meta["paths"]["1.scale"]
    assert not before.startswith("rule"), before

    @register_rule(_Halved)
    def _halved_rule(module: nn.Module, calls: list, ctx: object) -> None:
        call = calls[0]
        per_sample = (call.grad(0) * call.input).reshape(len(call.input), -1, D).sum(1)
        ctx.add("scale", per_sample.square().sum(0))  # type: ignore[attr-defined]

    after = _exact(model, data).meta["paths"]["1.scale"]
    assert plans.calls == 2 and after.startswith("rule"), after


@pytest.mark.filterwarnings("ignore::fisher_fast.fim.fallback.PerSampleLoopWarning")
def test_a_parameter_kept_as_zero_and_then_reached_is_planned_anew(plans: CallCounter) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = RoutedExperts(D, CLASSES).double().eval()
    x = torch.randn(N, D, dtype=torch.float64)
    x[:, 0] = -x[:, 0].abs()  # no sample routed: the expert is planned as zero
    first = _exact(model, [(x, torch.randint(0, CLASSES, (N,)))])
    assert float(first["routed.weight"].abs().max()) == 0.0
    routed = x.clone()
    routed[0, 0] = 1.0
    assert plans.calls == 1
    second = _exact(model, [(routed, torch.randint(0, CLASSES, (N,)))])
    # planned anew: once, or twice where the expert's one-row call is the same in the real and
    # the variant batch, so looks like a call on a constant table, and the batch is planned
    # once more with its parameters traced (which fails: they meet the samples in a matmul)
    assert plans.calls in (2, 3) and float(second["routed.weight"].abs().max()) > 0.0


def test_a_model_with_a_kept_plan_is_freed(plans: CallCounter) -> None:
    """The kept plan names modules by path: it holds neither the model nor its modules."""
    model = _Tokens().eval()
    fisher_fast.diag_fim(model, _data(1), progress=False)
    assert plan_cache.recall(model, plan_cache.signature(model)) is not None
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_plans_are_kept_per_model(plans: CallCounter) -> None:
    torch.manual_seed(random.randrange(2**31))
    a, b = _Tokens().double().eval(), _Tokens().double().eval()
    _exact(a, _data(1))
    _exact(b, _data(1))
    _exact(a, _data(1))
    assert plans.calls == 2


def test_a_language_model_with_a_tied_head_reuses_its_plan(plans: CallCounter) -> None:
    """GPT-2 with its head tied to the token embedding (the tie's cross term) and broadcast
    position ids: the second call, on other tokens, is exact with no new plan."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(random.randrange(2**31))
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=1, n_head=2, n_positions=8)
    model = tf.GPT2LMHeadModel(cfg).double().eval()

    def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)

    def batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"input_ids": torch.randint(0, VOCAB, (N, T))}, torch.randint(0, VOCAB, (N, T))

    for count in (1, 2):
        data = [batch() for _ in range(count)]
        fim = fisher_fast.diag_fim(model, data, loss=lm_loss, dtype=torch.float64, progress=False)
        errors = max_relative_error(fim, reference_fim_batches(model, data))
        assert max(errors.values()) <= 1e-10, errors
    assert plans.calls == 1
