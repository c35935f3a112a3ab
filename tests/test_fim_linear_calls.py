"""A Linear's weight passed to F.linear in its parent's forward (timm's BEiT, EVA, Swin V2):
the call routed through the Linear, so that its rule handles the weight, and the parent's own
biases, combined by ``torch.cat`` and added by that call, traced together to the samples.

Every case is checked against a float64 per-sample loop, in batches of 4 and 3 samples; calls
that cannot be routed (a bias beside the Linear's own, a weight used by a grandparent, a matrix
product) keep the per-sample path and stay exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from call_counter import CallCounter
from fim_reference import reference_fim
from torch import nn

import fisher_fast
from fisher_fast.fim import engine
from fisher_fast.fim.broadcast_params import PATH

N, T, C = 7, 5, 6
RULE = "rule linear_rule"


class QkvAttention(nn.Module):
    """BEiT's attention: ``qkv`` without a bias, the query and value biases its own, the key's
    a zero buffer; ``bias`` picks how the call is made (see the tests)."""

    def __init__(self, bias: str = "separate") -> None:
        super().__init__()
        self.bias = bias
        self.qkv = nn.Linear(C, 3 * C, bias=bias == "own")
        self.q_bias = nn.Parameter(torch.randn(C))
        self.v_bias = nn.Parameter(torch.randn(C))
        self.register_buffer("k_bias", torch.zeros(C), persistent=False)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.bias == "separate":
            qkv = F.linear(x, self.qkv.weight, qkv_bias)
        elif self.bias == "keyword":
            qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        elif self.bias == "own":  # the Linear's own bias, then the others added
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias) + qkv_bias
        elif self.bias == "beside_own":  # a bias given although the Linear has one: not routed
            qkv = F.linear(x, self.qkv.weight, qkv_bias)
        elif self.bias == "called_too":  # the Linear also called as a module
            qkv = self.qkv(x) + F.linear(x.tanh(), self.qkv.weight, qkv_bias)
        elif self.bias == "without_own":  # no bias although the Linear has one: not routed
            qkv = F.linear(x, self.qkv.weight) + qkv_bias
        else:  # "matmul": not an F.linear call
            qkv = x @ self.qkv.weight.T + qkv_bias
        q, k, v = qkv.chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) / C**0.5, dim=-1)
        return x + self.proj(attn @ v)


class Model(nn.Module):
    def __init__(self, bias: str = "separate", blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, C)
        self.blocks = nn.Sequential(*(QkvAttention(bias) for _ in range(blocks)))
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> fisher_fast.DiagFIM:
    fim = fisher_fast.diag_fim(model, (x, y), progress=False, dtype=torch.float64, batch_size=4)
    reference = reference_fim(model, x, y)
    worst = float((fim.flat - reference).abs().max())
    assert worst <= 1e-10 * float(reference.abs().max()), (worst, fim.meta["paths"])
    return fim


def _problem(
    gen: torch.Generator, **kwargs: object
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = Model(**kwargs).double()  # type: ignore[arg-type]
    x = torch.randn(N, T, 4, generator=gen, dtype=torch.float64)
    return model, x, torch.randint(3, (N,), generator=gen)


@pytest.mark.parametrize("bias", ["separate", "keyword"])
def test_a_functional_call_on_a_childs_weight_is_routed(bias: str, gen: torch.Generator) -> None:
    """The weight gets the Linear rule, the concatenated biases are traced together."""
    paths = _check(*_problem(gen, bias=bias)).meta["paths"]
    for i in range(2):
        assert paths[f"blocks.{i}.qkv.weight"] == RULE, paths
        assert paths[f"blocks.{i}.q_bias"] == PATH, paths
        assert paths[f"blocks.{i}.v_bias"] == PATH, paths
        assert paths[f"blocks.{i}.proj.weight"] == RULE, paths


def test_a_linear_also_called_as_a_module_is_called_twice(gen: torch.Generator) -> None:
    """Its own forward's F.linear is not routed again: two calls, both read by its rule."""
    paths = _check(*_problem(gen, bias="called_too")).meta["paths"]
    assert paths["blocks.0.qkv.weight"] == RULE, paths
    assert paths["blocks.1.v_bias"] == PATH, paths


def test_the_linears_own_bias_is_routed_with_it(gen: torch.Generator) -> None:
    paths = _check(*_problem(gen, bias="own")).meta["paths"]
    assert paths["blocks.0.qkv.weight"] == RULE, paths
    assert paths["blocks.0.qkv.bias"] == RULE, paths
    assert paths["blocks.1.q_bias"] == PATH, paths


@pytest.mark.parametrize("bias", ["beside_own", "without_own", "matmul"])
def test_calls_that_cannot_be_routed_stay_exact(bias: str, gen: torch.Generator) -> None:
    """Another bias than the Linear's own, or none (the Linear's call would add its own), or a
    matrix product: the attention is re-run per sample, as before."""
    model, x, y = _problem(gen, bias="matmul" if bias == "matmul" else "own")
    for block in model.blocks:
        block.bias = bias
    paths = _check(model, x, y).meta["paths"]
    assert paths["blocks.0.qkv.weight"] == "per-sample gradients of 'blocks.0' (QkvAttention)"


def test_a_repeated_call_reuses_the_routes(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept plan routes the calls again (plan_cache.py): its batches conform to it, so
    nothing is planned again, with the same result."""
    model, x, y = _problem(gen)
    first = _check(model, x, y)
    plans = CallCounter(monkeypatch, engine, "make_plan")
    again = _check(model, x, y)
    assert plans.calls == 0, "the repeated call planned again"
    assert again.meta["paths"] == first.meta["paths"]
    assert torch.equal(again.flat, first.flat)


def test_the_model_is_left_as_it_was(gen: torch.Generator) -> None:
    """No hook or mode remains after the call: the model's own forward is the plain one."""
    model, x, y = _problem(gen)
    before = model(x)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    _check(model, x, y)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert torch.equal(model(x), before)


def test_a_linear_with_a_hook_of_the_users_is_not_routed(gen: torch.Generator) -> None:
    """A forward hook on the Linear (here doubling its output) would run on a routed call that
    the model itself never makes: that Linear's calls are left as they are."""
    model, x, y = _problem(gen)
    model.blocks[0].qkv.register_forward_hook(lambda m, args, out: 2 * out)
    paths = _check(model, x, y).meta["paths"]
    assert paths["blocks.0.qkv.weight"] == "per-sample gradients of 'blocks.0' (QkvAttention)"
    assert paths["blocks.1.qkv.weight"] == RULE, paths
