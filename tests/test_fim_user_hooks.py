"""The user's forward hooks and instance forwards: a rule only where the module's output is its
class's forward of its inputs (fisher_fast/fim/hook_watch.py, rules.find_rule).

A rule reads a call's inputs and the gradient at its output, so a hook that replaces or edits
the output, or a forward replaced on the instance, would make it silently wrong; those modules
take the per-sample path. Hooks that only look keep the rule. Each case is compared with the
float64 per-sample loop, which runs the hooks as the model does.
"""

from __future__ import annotations

import random
import types
from collections.abc import Callable, Iterator

import pytest
import torch
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import fisher_fast

N, FEATURES, CLASSES = 5, 4, 3


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(FEATURES, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, CLASSES)
    ).double()


def _data(batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(N, FEATURES, dtype=torch.float64), torch.randint(0, CLASSES, (N,)))
        for _ in range(batches)
    ]


def _exact(model: nn.Module, data: list) -> dict[str, str]:
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, reuse_plan=False)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    return fim.meta["paths"]


def _scaled(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
    return out * 2.0 + 0.5


def _scaled_in_place(module: nn.Module, args: object, out: torch.Tensor) -> None:
    out.mul_(2.0)


def _shifted(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
    return out.roll(1, dims=-1)


HOOKS: dict[str, Callable[..., torch.Tensor | None]] = {
    "scaled": _scaled,
    "in_place": _scaled_in_place,
    "permuted": _shifted,
}


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(random.randrange(2**31))


@pytest.mark.parametrize("hooked", [0, 1, 3], ids=["linear", "layer_norm", "head"])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_hook_that_changes_the_output_sends_the_module_per_sample(hook: str, hooked: int) -> None:
    model = _model()
    model[hooked].register_forward_hook(HOOKS[hook])
    paths = _exact(model, _data())
    assert paths[f"{hooked}.weight"].startswith("per-sample"), paths
    others = [name for name in paths if not name.startswith(f"{hooked}.")]
    assert all(paths[name].startswith("rule") for name in others), paths


def test_hooks_that_only_look_keep_the_rules() -> None:
    model, seen = _model(), []
    for layer in model:
        layer.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model[0].register_forward_pre_hook(lambda m, a: (a[0] * 3.0,))  # inputs may change
    paths = _exact(model, _data())
    assert all(path.startswith("rule") for path in paths.values()), paths
    assert seen


@pytest.fixture
def global_hook() -> Iterator[None]:
    handle = register_module_forward_hook(
        lambda m, a, out: out * 2.0 if isinstance(m, nn.LayerNorm) else None
    )
    yield
    handle.remove()


@pytest.mark.usefixtures("global_hook")
def test_a_global_hook_that_changes_outputs_is_seen() -> None:
    """Global hooks run before any of a module's own, so whether they change an output is not
    seen: no module keeps a rule while one is registered."""
    paths = _exact(_model(), _data())
    assert all(path.startswith("per-sample") for path in paths.values()), paths


def _doubles_marked_samples(
    module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
) -> torch.Tensor | None:
    """Doubles the output of the samples whose first input feature is marked (> 50), and
    leaves a batch without any untouched (a hook whose effect depends on the data)."""
    marked = args[0][:, 0] > 50
    return torch.where(marked[:, None], out * 2.0, out) if bool(marked.any()) else None


def test_a_hook_that_starts_changing_the_output_later_is_planned_anew() -> None:
    """No sample of the first batch is marked, so the hook changes nothing there and the
    layer keeps its rule; the second batch, where it acts, must not."""
    model = _model()
    model[0].register_forward_hook(_doubles_marked_samples)
    data = _data(batches=2)
    data[1][0][0, 0] = 100.0
    paths = _exact(model, data)
    assert paths["0.weight"].startswith("per-sample"), paths


def _first_feature_only(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.Linear.forward(self, x[:, :1].expand_as(x))


def _wrapped(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.Linear.forward(self, x.clone())  # as a wrapper moving inputs between devices does


@pytest.mark.parametrize(
    ("forward", "rule"), [(_first_feature_only, False), (_wrapped, True)], ids=["other", "same"]
)
def test_an_instance_forward_keeps_the_rule_only_when_it_computes_the_same(
    forward: Callable[..., torch.Tensor], rule: bool
) -> None:
    model = _model().eval()
    model[0].forward = types.MethodType(forward, model[0])
    paths = _exact(model, _data())
    assert paths["0.weight"].startswith("rule") == rule, paths
    assert model[0].__dict__["forward"].__func__ is forward


def test_an_instrumented_layer_gives_back_the_users_instance_forward() -> None:
    """An LSTM whose rule instruments its forward, with a forward of the user's on the
    instance: not verifiable, so no rule; the user's forward is still there afterwards."""
    lstm = nn.LSTM(FEATURES, 5, batch_first=True).double()
    calls = []

    def forward(self: nn.LSTM, x: torch.Tensor, *rest: object) -> object:
        calls.append(1)
        return nn.LSTM.forward(self, x, *rest)

    lstm.forward = types.MethodType(forward, lstm)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = lstm, nn.Linear(5, CLASSES).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    data = [(torch.randn(N, 3, FEATURES, dtype=torch.float64), torch.randint(0, CLASSES, (N,)))]
    paths = _exact(Net(), data)
    assert not paths["lstm.weight_ih_l0"].startswith("rule"), paths
    assert lstm.__dict__["forward"].__func__ is forward and calls
