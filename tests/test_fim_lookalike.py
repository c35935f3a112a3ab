"""Subclasses and look-alikes of torch's layers (as timm writes them): a rule only when verified.

Each case has a variant that computes the layer's formula (its rule must be used, and exact)
and one that computes something else (the generic path, still exact). Every result is checked
against a float64 per-sample loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fim_reference import batchnorm_stats_randomised, reference_fim
from torch import nn

import fisher_fast

N, C = 6, 4


class FusedLayerNorm(nn.LayerNorm):
    """timm's LayerNorm: its own forward, the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class OffsetLayerNorm(nn.LayerNorm):
    """Other math: a weight of 1 + weight (as some models write it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, 1 + self.weight, self.bias, self.eps)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """timm's LayerNorm2d: normalises the channels of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return y.permute(0, 3, 1, 2)


class WidthLayerNorm(nn.LayerNorm):
    """A LayerNorm over the last axis (W) of an image, weight of size W: the plain LayerNorm
    rule (positions N, C, H), not mistaken for a channels-first one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: eval-mode BatchNorm, then an in-place activation."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(self.drop(x))


class QuickGELU(nn.Module):
    """An elementwise activation torch has no class for (Hugging Face's QuickGELUActivation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Centred(nn.Module):
    """Not elementwise: each entry minus the mean over its channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(1, keepdim=True)


class GroupNormActivation(nn.GroupNorm):
    """Hugging Face's BitGroupNormActivation: the activation is ``activation``, with no ``drop``."""

    def __init__(self, channels: int, activation: nn.Module) -> None:
        super().__init__(2, channels)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.activation(x)


class ScaledLinear(nn.Linear):
    """A Linear subclass with other math (a weight transform)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight.abs(), self.bias)


class PlainLinear(nn.Linear):
    """A Linear subclass whose forward is F.linear (timm's Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _image_model(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), norm, nn.Flatten(), nn.Linear(C * 5 * 5, 3))


def _token_model(norm: nn.Module, head: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), norm, nn.Tanh(), head or nn.Linear(8, 3))


CASES = {
    # name: (model factory, input shape, name of the tested module, expected path)
    "fused_layer_norm": (
        lambda: _token_model(FusedLayerNorm(8)), (N, 3, 5), "1", "rule layer_norm_rule"
    ),
    "offset_layer_norm": (
        lambda: _token_model(OffsetLayerNorm(8)), (N, 3, 5), "1", "per-sample gradients"
    ),
    "channels_first_layer_norm": (
        lambda: _image_model(ChannelsFirstLayerNorm(C)), (N, 3, 5, 5), "1",
        "rule channels_first_layer_norm_rule",
    ),
    "width_layer_norm": (
        lambda: _image_model(WidthLayerNorm(5)), (N, 3, 5, 5), "1", "rule layer_norm_rule"
    ),
    "batch_norm_silu_in_place": (
        lambda: _image_model(BatchNormAct(C, nn.SiLU(inplace=True))), (N, 3, 5, 5), "1",
        "rule norm_act_rule",
    ),
    "batch_norm_softmax": (  # not an elementwise activation: not recognised
        lambda: _image_model(BatchNormAct(C, nn.Softmax(dim=1))), (N, 3, 5, 5), "1",
        "per-sample gradients",
    ),
    "group_norm_activation_quick_gelu": (
        lambda: _image_model(GroupNormActivation(C, QuickGELU())), (N, 3, 5, 5), "1",
        "rule norm_act_rule",
    ),
    "group_norm_activation_centred": (  # an activation mixing entries: not recognised
        lambda: _image_model(GroupNormActivation(C, Centred())), (N, 3, 5, 5), "1",
        "per-sample gradients",
    ),
    "plain_linear": (
        lambda: _token_model(nn.LayerNorm(8), PlainLinear(8, 3)), (N, 3, 5), "3",
        "rule linear_rule",
    ),
    "scaled_linear": (
        lambda: _token_model(nn.LayerNorm(8), ScaledLinear(8, 3)), (N, 3, 5), "3",
        "per-sample gradients",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_rule_only_where_verified_and_exact_everywhere(case: str, gen: torch.Generator) -> None:
    factory, shape, module_name, path = CASES[case]
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = batchnorm_stats_randomised(factory().double().eval(), gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    logits = model(x)
    y = torch.randint(logits.shape[-1], logits.shape[:-1], generator=gen)
    if y.dim() > 1:  # a token per position: sum the loss over positions
        loss = "lm"
        fim = fisher_fast.diag_fim(
            model, (x, y), progress=False, dtype=torch.float64,
            loss=lambda out, t: F.cross_entropy(out.transpose(1, 2), t, reduction="none").sum(1),
        )  # fmt: skip
    else:
        loss = "cross_entropy"
        fim = fisher_fast.diag_fim(model, (x, y), progress=False, dtype=torch.float64)
    assert fim.meta["paths"][f"{module_name}.weight"].startswith(path)
    if loss == "cross_entropy":
        reference = reference_fim(model, x, y)
    else:
        reference = _token_reference(model, x, y)
    error = (fim.flat.double() - reference).abs().max() / reference.abs().max()
    assert error <= 1e-10, f"{case}: relative error {error:.2e}"


def _token_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat float64 empirical diagonal FIM with the loss summed over positions, by a loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(x.shape[0]):
        objective = F.cross_entropy(model(x[i : i + 1])[0], y[i], reduction="sum")
        grads = torch.autograd.grad(objective, params)
        total += torch.cat([g.reshape(-1) for g in grads]).square()
    return total / x.shape[0]


def test_the_check_runs_once_per_module_and_not_through_hooks() -> None:
    """The verification calls the module's own forward directly, once: forward hooks (a user's,
    or fisher_fast's own recording) do not see it, and later batches do not repeat it."""

    class Counted(FusedLayerNorm):
        forwards = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Counted.forwards += 1
            return super().forward(x)

    norm = Counted(8)
    model = _token_model(norm).double().eval()
    hooked: list[int] = []
    norm.register_forward_hook(lambda m, args, out: hooked.append(1))
    batches = [(torch.randn(N, 3, 5, dtype=torch.float64), torch.randint(3, (N, 3)))] * 3
    fim = fisher_fast.diag_fim(
        model, batches, progress=False,
        loss=lambda out, t: F.cross_entropy(out.transpose(1, 2), t, reduction="none").sum(1),
    )  # fmt: skip
    assert fim.meta["paths"]["1.weight"] == "rule layer_norm_rule"
    assert len(hooked) >= 3, "one call per batch at least"
    assert Counted.forwards == len(hooked) + 1, "one check, outside the hooks"


@pytest.mark.parametrize(
    "act",
    [
        nn.Identity(), nn.ReLU(inplace=True), nn.GELU(approximate="tanh"), nn.GELU(),
        nn.Hardswish(), nn.SiLU(), nn.Mish(), nn.LeakyReLU(0.2),
    ],
    ids=lambda a: repr(a),
)  # fmt: skip
def test_norm_then_activation_for_each_activation(act: nn.Module, gen: torch.Generator) -> None:
    """The activation's backward by its own op (ReLU, SiLU, GELU, Hardswish, Identity) or by
    autograd (the others) gives the same exact result."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = batchnorm_stats_randomised(_image_model(BatchNormAct(C, act)).double().eval(), gen)
    x = torch.randn(N, 3, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (N,), generator=gen)
    fim = fisher_fast.diag_fim(model, (x, y), progress=False, dtype=torch.float64)
    # With Identity the module computes BatchNorm2d's forward: the plain rule, as verified.
    expected = "rule batch_norm_rule" if isinstance(act, nn.Identity) else "rule norm_act_rule"
    assert fim.meta["paths"]["1.weight"] == expected
    reference = reference_fim(model, x, y)
    assert (fim.flat - reference).abs().max() <= 1e-10 * reference.abs().max()


class PlainRMSNorm(nn.Module):
    """An RMSNorm of another library (recognised by name): weight ∘ x / rms(x)."""

    def __init__(self, features: int, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(features) + 0.5)
        self.eps, self.offset = 1e-6, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (self.offset + self.weight) * x * rms


class OffsetRMSNorm(PlainRMSNorm):
    """Gemma's form, (1 + weight) ∘ x̂: named like an RMSNorm, other math."""

    def __init__(self, features: int) -> None:
        super().__init__(features, offset=1.0)


@pytest.mark.parametrize(
    "norm, path",
    [(PlainRMSNorm, "rule matched_rms_rule"), (OffsetRMSNorm, "broadcast use expanded")],
)
def test_rms_norm_look_alikes_only_when_verified(
    norm: type[nn.Module], path: str, gen: torch.Generator
) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(5, 8), norm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (N,), generator=gen)
    fim = fisher_fast.diag_fim(model, (x, y), progress=False, dtype=torch.float64)
    assert fim.meta["paths"]["1.weight"].startswith(path)
    reference = reference_fim(model, x, y)
    assert (fim.flat - reference).abs().max() <= 1e-10 * reference.abs().max()
