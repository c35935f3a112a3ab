"""Parameters no module call uses are zero, checked on every batch (fisher_fast/fim/unused.py).

Each model is compared with the float64 per-sample loop; the point of the new path is that an
unused parameter no longer sends its parameters to per-sample gradients of the whole model, so
the tests also check which path each parameter took.
"""

from __future__ import annotations

import random

import pytest
import torch
from fim_reference import max_relative_error, reference_fim_batches
from layer_models import RoutedExperts
from torch import nn

import fisher_fast
from fisher_fast.fim.unused import PATH, any_reached, reached_parameters

CLASSES = 3
FEATURES = 5
N = 4


def _batches(model_inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, torch.randint(0, CLASSES, (len(x),))) for x in model_inputs]


def _assert_exact(model: nn.Module, data: list) -> fisher_fast.DiagFIM:
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) < 1e-10, errors
    return fim


class _SpareHead(nn.Module):
    """A head defined and never called (a common leftover), beside a used one."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(FEATURES, 6), nn.Linear(6, CLASSES)
        self.spare = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_a_module_never_called_is_zero_and_sends_nothing_per_sample() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _SpareHead().double()
    data = _batches([torch.randn(N, FEATURES, dtype=torch.float64) for _ in range(3)])
    fim = _assert_exact(model, data)
    paths = fim.meta["paths"]
    spare = [name for name in paths if name.startswith("spare.")]
    assert len(spare) == 4 and all(paths[name] == PATH for name in spare), paths
    assert all(paths[name].startswith("rule ") for name in paths if name not in spare), paths
    assert all(float(fim[name].abs().max()) == 0.0 for name in spare)


@pytest.mark.filterwarnings("ignore::fisher_fast.fim.fallback.PerSampleLoopWarning")
@pytest.mark.parametrize("first_used_in", [1, 2])
def test_an_expert_first_routed_to_in_a_later_batch_gets_its_gradient(first_used_in: int) -> None:
    """The routed expert gets no sample in the first batches, so it is planned as zero while
    the shared one keeps the layouts it was planned for; the batch that routes samples to it
    reaches it and is planned anew, so nothing of it is lost."""
    torch.manual_seed(random.randrange(2**31))
    model = RoutedExperts(FEATURES, CLASSES).double()
    xs = [torch.randn(N, FEATURES, dtype=torch.float64) for _ in range(3)]
    for k, x in enumerate(xs):
        x[:, 0] = -x[:, 0].abs() - 0.1  # no sample to the routed expert ...
        if k >= first_used_in:
            x[::2, 0] *= -1  # ... and from this batch on, half of them
    fim = _assert_exact(model, _batches(xs))
    assert float(fim["routed.weight"].abs().min()) > 0
    assert fim.meta["paths"]["routed.weight"] != PATH
    assert fim.meta["paths"]["shared.weight"].startswith("rule ")


class _BorrowedWeight(nn.Module):
    """``lookup``'s weight is used by the parent, outside ``lookup.forward``: it never runs,
    yet its parameter is used."""

    def __init__(self) -> None:
        super().__init__()
        self.lookup = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.sin(), self.lookup.weight) + self.lookup.bias


def test_a_parameter_used_outside_its_module_is_not_taken_for_unused() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _BorrowedWeight().double()
    data = _batches([torch.randn(N, FEATURES, dtype=torch.float64) for _ in range(2)])
    fim = _assert_exact(model, data)
    assert PATH not in fim.meta["paths"].values()
    assert float(fim["lookup.weight"].abs().min()) > 0


def test_the_graph_walk_finds_exactly_the_parameters_the_output_depends_on() -> None:
    torch.manual_seed(random.randrange(2**31))
    a, b, c = (nn.Parameter(torch.randn(3)) for _ in range(3))
    frozen = torch.randn(3)  # no gradient accumulator: never reported
    shared = a * 2  # a diamond: two paths from the output down to a
    out = {"x": (shared.sin() + shared.cos() + frozen, [b.exp()]), "note": "not a tensor"}
    found = reached_parameters(out)
    assert found == {id(a), id(b)}
    assert any_reached(out, [c, b]) and not any_reached(out, [c]) and not any_reached(out, [])
    assert reached_parameters(torch.randn(2)) == set()  # a tensor outside any graph
