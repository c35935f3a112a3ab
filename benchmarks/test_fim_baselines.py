"""Correctness of every benchmark baseline against a float64 per-sample autograd reference.

Each method of `fim_baselines.METHODS` runs on every benchmark model with a few samples and must
match the reference for the quantity it claims to compute (empirical, exact or batch-grad²), so
that the timing tables compare like with like. Combinations a peer library cannot handle are
listed in ``EXPECTED_FAILURES`` and must fail with that reason: if a peer gains support, the test
says so. A peer's tests are skipped only when the peer cannot be imported.
"""

from __future__ import annotations

import copy

import fim_baselines as fb
import pytest
import torch
import torch.nn.functional as F
from fim_models import PROBLEMS, Problem, make_problem
from torch import nn

N_SAMPLES = 2  # per-sample, not batch, gradients; kept tiny because float64 CPU convs are slow

# (method, model) → text the raised error must contain.
EXPECTED_FAILURES = {
    ("backpack_sum_grad_squared", "transformer"): "MultiheadAttention",
    ("backpack_diag_ggn_exact", "transformer"): "LayerNorm",
    ("opacus_grad_sample", "resnet18"): "BatchNorm2d",
    ("opacus_grad_sample", "transformer"): "MultiheadAttention",
    ("nngeometry_diag_empirical", "transformer"): "Embedding",
    ("nngeometry_diag", "transformer"): "Embedding",
}


def reference_diagonal(problem: Problem, kind: str) -> torch.Tensor:
    """The diagonal of kind ``kind`` in float64, one autograd call per sample (and class).

    * ``empirical``: ``(1/N) Σ_i (∇ L_i)²``;
    * ``exact``: ``(1/N) Σ_i Σ_c p_ic (∇ log p_ic)²``;
    * ``batch-grad²``: ``(∇ (1/N) Σ_i L_i)²``.
    """
    model = copy.deepcopy(problem.model).double()
    inputs = problem.inputs.double() if problem.inputs.is_floating_point() else problem.inputs
    params = [p for _, p in fb.trainable(model)]
    n = len(inputs)
    if kind == "batch-grad²":
        grads = torch.autograd.grad(F.cross_entropy(model(inputs), problem.targets), params)
        return torch.cat([g.square().reshape(-1) for g in grads])
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(n):
        log_probs = torch.log_softmax(model(inputs[i : i + 1]), dim=1)[0]
        for weight, value in _weighted_log_likelihoods(log_probs, problem.targets[i], kind):
            grads = torch.autograd.grad(value, params, retain_graph=True)
            total += weight * torch.cat([g.square().reshape(-1) for g in grads])
    return total / n


def _weighted_log_likelihoods(
    log_probs: torch.Tensor, target: torch.Tensor, kind: str
) -> list[tuple[float, torch.Tensor]]:
    """(weight, log-likelihood term) pairs whose weighted squared gradients make one sample."""
    if kind == "empirical":
        return [(1.0, log_probs[target])]
    probs = log_probs.detach().exp()
    return [(probs[c].item(), log_probs[c]) for c in range(len(log_probs))]


class _LazyReferences(dict):
    """Reference diagonals by (model, kind), computed on first use and cached."""

    def __init__(self, problems: dict[str, Problem]) -> None:
        super().__init__()
        self.problems = problems

    def __missing__(self, key: tuple[str, str]) -> torch.Tensor:
        self[key] = reference_diagonal(self.problems[key[0]], key[1])
        return self[key]


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    return {name: make_problem(name, n=N_SAMPLES, small=True) for name in PROBLEMS}


@pytest.fixture(scope="module")
def references(problems: dict[str, Problem]) -> _LazyReferences:
    return _LazyReferences(problems)


def _skip_unless_available(method: str) -> None:
    """Skip when the method's library does not import (or fisher_fast lacks ``diag_fim``)."""
    library = fb.METHODS[method].library
    if library is None:
        return
    module = pytest.importorskip(library)
    if library == "fisher_fast" and not hasattr(module, "diag_fim"):
        pytest.skip("fisher_fast.diag_fim not implemented yet")


@pytest.mark.parametrize("model_name", list(PROBLEMS))
@pytest.mark.parametrize("method", list(fb.METHODS))
def test_matches_float64_reference(
    method: str, model_name: str, problems: dict[str, Problem], references: _LazyReferences
) -> None:
    _skip_unless_available(method)
    spec = fb.METHODS[method]
    problem = problems[model_name]
    expected_failure = EXPECTED_FAILURES.get((method, model_name))
    if expected_failure is not None:
        with pytest.raises(Exception, match=expected_failure):
            spec.fn(*problem)
        return
    actual = spec.fn(*problem)
    expected = references[model_name, spec.kind]
    assert actual.dtype == torch.float32
    torch.testing.assert_close(
        actual, expected.float(), rtol=1e-3, atol=1e-5 * expected.abs().max().item()
    )


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("method", list(fb.METHODS))
def test_leaves_model_reusable(method: str) -> None:
    """Two calls on one model agree and leave no hooks, gradients or changed modes behind."""
    _skip_unless_available(method)
    problem = make_problem("mlp", n=N_SAMPLES, small=True)
    first = fb.METHODS[method].fn(*problem)
    second = fb.METHODS[method].fn(*problem)
    torch.testing.assert_close(first, second)
    assert _hook_count(problem.model) == 0
    assert all(p.grad is None for p in problem.model.parameters())
    assert not any(m.training for m in problem.model.modules())


def test_problems_are_seeded_and_in_eval_mode() -> None:
    for name in PROBLEMS:
        first, second = make_problem(name, n=2), make_problem(name, n=2)
        assert not first.model.training
        assert torch.equal(first.inputs, second.inputs)
        assert torch.equal(first.targets, second.targets)
        for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
            assert torch.equal(p, q)
