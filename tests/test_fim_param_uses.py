"""Parameters used outside the module that holds them (fisher_fast/fim/param_uses.py).

A rule reads its module's calls only, so a weight also used directly elsewhere (a head computed
as ``h @ embedding.weight.T``, ``F.linear(x, self.proj.weight)`` in a parent's forward, a
parameter handed to a child module) would get only part of its gradient from the rule: a wrong
number without a warning. Such parameters take the per-sample path of the nearest module that
encloses every use; uses that carry no gradient keep the rule. Each case is compared with the
float64 per-sample loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast

N, FEATURES, CLASSES, VOCAB = 5, 4, 3, 7


def _exact(model: nn.Module, data: list) -> dict[str, str]:
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, reuse_plan=False)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    return fim.meta["paths"]


def _features(batches: int = 2) -> list:
    return [
        (torch.randn(N, FEATURES, dtype=torch.float64), torch.randint(0, CLASSES, (N,)))
        for _ in range(batches)
    ]


def _tokens(batches: int = 2, positions: int = 6) -> list:
    return [
        (torch.randint(0, VOCAB, (N, positions)), torch.randint(0, CLASSES, (N,)))
        for _ in range(batches)
    ]


class ParentUsesChildWeight(nn.Module):
    """A Linear called as a module, and its weight used again in the parent's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, 6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x) + F.linear(x.square(), self.proj.weight)))


class FunctionalTiedHead(nn.Module):
    """Logits from the token embedding's weight (``h @ E^T``), as many language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(ids))).mean(1)
        return h @ self.embed.weight[:CLASSES].T


class Scaler(nn.Module):
    def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return x * gain


class HandsWeightToChild(nn.Module):
    """A Linear whose own parameter is also multiplied in by a child module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, FEATURES)
        self.scale = Scaler()
        self.head = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.proj(x), self.proj.bias))


class TiedAndUsedAgain(nn.Module):
    """An Embedding tied to a Linear head (both rules and their cross term, normally), with the
    shared weight also read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).mean(1) + self.embed.weight.mean(0)
        return self.head(h)[:, :CLASSES]


class AttentionProjectionUsedAgain(nn.Module):
    """nn.MultiheadAttention (its rule handles out_proj), with out_proj's weight used again."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(FEATURES, 2, batch_first=True)
        self.head = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.unsqueeze(1).expand(-1, 3, -1) * torch.arange(1.0, 4.0, dtype=x.dtype)[:, None]
        out, _ = self.attn(seq, seq, seq)
        return self.head(out.mean(1) @ self.attn.out_proj.weight)


CASES = {
    "parent uses a child's weight": (ParentUsesChildWeight, _features, "proj.weight"),
    "head from the embedding's weight": (FunctionalTiedHead, _tokens, "embed.weight"),
    "weight handed to a child": (HandsWeightToChild, _features, "proj.bias"),
    "tied weight also read directly": (TiedAndUsedAgain, _tokens, "embed.weight"),
    "attention projection used again": (
        AttentionProjectionUsedAgain,
        _features,
        "attn.out_proj.weight",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_used_outside_its_module_is_exact(case: str) -> None:
    make, data, name = CASES[case]
    torch.manual_seed(0)
    paths = _exact(make().double(), data())
    assert paths[name].startswith("per-sample gradients of"), paths[name]


def test_other_parameters_of_the_module_keep_their_rule() -> None:
    torch.manual_seed(0)
    paths = _exact(ParentUsesChildWeight().double(), _features())
    assert paths["proj.bias"] == "rule linear_rule"
    assert paths["head.weight"] == "rule linear_rule"


class LooksWithoutGradient(nn.Module):
    """Reads a weight's shape, a detached copy and its norm under no_grad outside the Linear:
    none of it carries a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            norm = self.proj.weight.norm()
        scale = self.proj.weight.detach().abs().mean() / norm
        return self.proj(x) * scale * self.proj.weight.shape[1]


def test_uses_without_gradient_keep_the_rule() -> None:
    torch.manual_seed(0)
    paths = _exact(LooksWithoutGradient().double(), _features())
    assert paths["proj.weight"] == "rule linear_rule"


def test_a_plan_kept_between_calls_stays_exact() -> None:
    """The second call starts from the kept plan (no new recording of uses) and still sends the
    parameter per sample."""
    torch.manual_seed(0)
    model = FunctionalTiedHead().double()
    data = _tokens()
    first = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    second = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(second, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    assert first.meta["paths"] == second.meta["paths"]
