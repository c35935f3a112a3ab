"""diag_fim against a float64 per-sample autograd loop, per layer, model, Fisher kind and backend.

Every setting builds a fresh random problem (no fixed data); the seed is in the test id's
parameters so a failure can be replayed. Each layer is tested inside a small classifier
(layer -> flatten -> linear head) so every Fisher kind applies.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from fim_reference import (
    batchnorm_stats_randomised,
    max_relative_error,
    reference_fim,
    reference_fim_batches,
    relative_error,
)
from layer_models import Scale
from torch import nn

import fisher_fast

CLASSES = 3
N = 6


@dataclass
class Setting:
    """A small problem: a layer (or model) factory and an input factory."""

    id: str
    layer: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    head: bool = True  # append flatten + linear head (False: the model already ends in logits)


def _x(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(N, *shape, generator=g)


def _tokens(vocab: int, length: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, vocab, (N, length), generator=g)


class Twice(nn.Module):
    """Weight sharing: one module applied twice in one forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.tanh(self.inner(x)))


class UsesChildWeight(nn.Module):
    """Uses its child's weight outside the child's forward, and its own parameter first."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.randn(4))
        self.after = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x + self.offset, self.proj.weight, self.proj.bias)
        return self.after(torch.relu(h))


class BorrowsChildWeight(nn.Module):
    """Holds no parameter of its own and uses its child's weight without calling the child (in
    a matrix product: ``F.linear`` would be routed through the child, linear_calls.py), so the
    plan goes to it, an ancestor of the parameter's owner."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.proj.weight.T + self.proj.bias)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


SETTINGS = [
    Setting("linear-2d", lambda: nn.Linear(5, 4), _x(5)),
    Setting("linear-3d", lambda: nn.Linear(5, 4), _x(3, 5)),
    Setting("linear-4d-nobias", lambda: nn.Linear(5, 4, bias=False), _x(2, 3, 5)),
    Setting("linear-shared", lambda: Twice(nn.Linear(5, 5)), _x(5)),
    Setting("linear-3d-shared", lambda: Twice(nn.Linear(5, 5)), _x(3, 5)),
    Setting("conv1d", lambda: nn.Conv1d(3, 4, 3), _x(3, 9)),
    Setting(
        "conv1d-stride-dilation",
        lambda: nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=2),
        _x(2, 11),
    ),
    Setting(
        "conv1d-same-replicate",
        lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="replicate"),
        _x(2, 7),
    ),
    Setting("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), _x(3, 6, 6)),
    Setting("conv2d-1x1", lambda: nn.Conv2d(5, 3, 1), _x(5, 4, 3)),
    Setting("conv2d-1x1-stride2", lambda: nn.Conv2d(3, 4, 1, stride=2, bias=False), _x(3, 5, 5)),
    Setting(
        "conv2d-stride2-rect",
        lambda: nn.Conv2d(2, 3, (3, 2), stride=2, padding=(1, 0)),
        _x(2, 7, 6),
    ),
    Setting(
        "conv2d-groups-dilation",
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2),
        _x(4, 7, 7),
    ),
    Setting("conv2d-depthwise", lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), _x(4, 5, 5)),
    Setting("conv2d-same", lambda: nn.Conv2d(2, 3, 4, padding="same"), _x(2, 6, 6)),
    Setting(
        "conv2d-reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), _x(2, 5, 5)
    ),
    Setting(
        "conv2d-circular-nobias",
        lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular", bias=False),
        _x(2, 5, 5),
    ),
    Setting("conv2d-shared", lambda: Twice(nn.Conv2d(3, 3, 3, padding=1)), _x(3, 5, 5)),
    Setting("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), _x(2, 4, 5, 4)),
    Setting("batchnorm1d", lambda: nn.BatchNorm1d(5), _x(5)),
    Setting("batchnorm1d-seq", lambda: nn.BatchNorm1d(3), _x(3, 4)),
    Setting("batchnorm2d", lambda: nn.BatchNorm2d(3), _x(3, 4, 4)),
    Setting("batchnorm3d", lambda: nn.BatchNorm3d(2), _x(2, 3, 3, 3)),
    Setting("layernorm", lambda: nn.LayerNorm(5), _x(3, 5)),
    Setting("layernorm-2d-shape", lambda: nn.LayerNorm((3, 4)), _x(2, 3, 4)),
    Setting("groupnorm", lambda: nn.GroupNorm(2, 4), _x(4, 3, 3)),
    Setting("rmsnorm", lambda: nn.RMSNorm(5), _x(3, 5)),
    Setting("rmsnorm-2d-shape-eps", lambda: nn.RMSNorm((3, 4), eps=1e-3), _x(2, 3, 4)),
    Setting("instancenorm2d-affine", lambda: nn.InstanceNorm2d(3, affine=True), _x(3, 4, 4)),
    Setting("embedding", lambda: nn.Embedding(7, 4), _tokens(7, 9)),
    Setting("embedding-padding", lambda: nn.Embedding(7, 4, padding_idx=2), _tokens(7, 9)),
    Setting("embedding-freq", lambda: nn.Embedding(5, 3, scale_grad_by_freq=True), _tokens(5, 9)),
    Setting("fallback-custom", lambda: Scale(5), _x(5)),
    Setting("fallback-orphan", lambda: UsesChildWeight(), _x(4)),
    Setting("fallback-borrowed", lambda: BorrowsChildWeight(), _x(4)),
    Setting("multihead-attention", lambda: _SelfAttention(), _x(4, 6)),
    Setting("cnn-batchnorm", SmallCNN, _x(3, 8, 8), head=False),
    Setting("transformer", TinyTransformer, _tokens(11, 5), head=False),
]


SETTINGS_BY_ID = {s.id: s for s in SETTINGS}


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def build(setting: Setting, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = setting.layer()
    x = setting.inputs(g)
    if setting.head:
        with torch.no_grad():
            width = layer.eval()(x).reshape(N, -1).shape[1]
        model: nn.Module = nn.Sequential(layer, nn.Flatten(), nn.Linear(width, CLASSES))
    else:
        model = layer
    batchnorm_stats_randomised(model, g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return model.eval(), x, y


def _mc_labels(
    model: nn.Module, x: torch.Tensor, seed: int, k: int, dtype: torch.dtype
) -> torch.Tensor:
    with torch.no_grad():
        logits = model.to(dtype)(x.to(dtype) if x.is_floating_point() else x)
    return fisher_fast.sample_labels(logits, k, torch.Generator().manual_seed(seed))


def _fim_and_loop(
    setting: Setting,
    seed: int,
    *,
    backend: str,
    batch_size: int,
    fisher: str = "empirical",
    mc_samples: int = 2,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat diag_fim of the setting's model in ``dtype``, and the float64 per-sample loop's FIM
    of the same model with the same MC draws."""
    model, x, y = build(setting, seed)
    model = model.to(dtype)
    inputs = x.to(dtype) if x.is_floating_point() else x
    labels = _mc_labels(model, inputs, seed, mc_samples, dtype) if fisher == "mc" else None
    fim = fisher_fast.diag_fim(
        model,
        (inputs, y),
        fisher=fisher,
        mc_samples=mc_samples,
        generator=torch.Generator().manual_seed(seed),
        dtype=dtype,
        backend=backend,
        progress=False,
        batch_size=batch_size,
    )
    assert fim.flat.dtype == dtype
    return fim.flat, reference_fim(model, x, y, fisher=fisher, labels=labels)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.id for s in SETTINGS])
def test_matches_per_sample_loop(setting: Setting, fisher: str, backend: str) -> None:
    seed = random.randrange(2**31)
    batch_size = 4 if fisher == "empirical" else N
    fim, ref = _fim_and_loop(setting, seed, fisher=fisher, backend=backend, batch_size=batch_size)
    assert fim.shape == ref.shape
    assert relative_error(fim, ref) < 2e-5, f"seed {seed}"


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.id for s in SETTINGS])
def test_float64_matches_to_rounding(setting: Setting, backend: str) -> None:
    seed = random.randrange(2**31)
    fim, ref = _fim_and_loop(setting, seed, backend=backend, batch_size=4, dtype=torch.float64)
    assert relative_error(fim, ref) < 1e-10, f"seed {seed}"


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("fisher", ["mc", "exact"])
@pytest.mark.parametrize("setting_id", ["linear-2d", "linear-4d-nobias", "cnn-batchnorm"])
def test_several_passes_float64_match_to_rounding(
    setting_id: str, fisher: str, backend: str
) -> None:
    """The kinds with one backward pass per draw or class, where a Linear layer without extra
    axes adds up its squared output gradients over the passes before its one product."""
    seed = random.randrange(2**31)
    fim, ref = _fim_and_loop(
        SETTINGS_BY_ID[setting_id],
        seed,
        fisher=fisher,
        backend=backend,
        batch_size=N,
        mc_samples=3,
        dtype=torch.float64,
    )
    assert relative_error(fim, ref) < 1e-10, f"seed {seed}"


def test_names_and_shapes_follow_named_parameters() -> None:
    model, x, y = build(SETTINGS[-2], random.randrange(2**31))
    fim = fisher_fast.diag_fim(model, (x, y), progress=False)
    assert fim.names == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert fim[name].shape == p.shape


def test_a_borrowed_weight_costs_no_repeated_forward_pass() -> None:
    model, x, y = build(SETTINGS_BY_ID["fallback-borrowed"], random.randrange(2**31))
    head_runs: list[int] = []
    model[2].register_forward_pre_hook(lambda m, args: head_runs.append(args[0].shape[0]))
    fisher_fast.diag_fim(model, (x, y), progress=False, batch_size=3)
    sizes = [len(chunk) for chunk in torch.arange(N).split(3)]
    # the first batch runs (every module tapped), then as a 2-sample variant (layouts), once
    assert head_runs == [sizes[0], 2, *sizes[1:]]


class _OptionalBranch(nn.Module):
    """Runs ``extra`` only for batches that carry the input "extra" (dict inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.extra = nn.Linear(3, CLASSES), nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        out = self.main(x)
        return out if extra is None else out + self.extra(extra)


def test_a_batch_of_other_layouts_gets_a_plan_of_its_own() -> None:
    """A module first run in a later batch (a new input): that batch is planned anew."""
    torch.manual_seed(random.randrange(2**31))
    y = torch.randint(0, CLASSES, (4,))
    x = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    data = [({"x": x[0]}, y), ({"x": x[1], "extra": x[2]}, y)]
    model = _OptionalBranch().double()
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) < 1e-10, errors
    assert float(fim["extra.weight"].abs().max()) > 0


def test_a_module_not_run_in_any_batch_is_planned_as_zero() -> None:
    torch.manual_seed(random.randrange(2**31))
    data = []
    for _ in range(2):
        y = torch.randint(0, CLASSES, (4,))
        data.append(({"x": torch.randn(4, 3, dtype=torch.float64), "extra": None}, y))
    model = _OptionalBranch().double()
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    assert fim.meta["paths"]["extra.weight"] == "unused by the forward pass (zero)"
    assert fim.meta["paths"]["main.weight"] == "rule linear_rule"
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) < 1e-10, errors
    assert float(fim["extra.weight"].abs().max()) == 0.0


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_frozen_parameters_are_left_out(frozen: str, backend: str) -> None:
    model, x, y = build(SETTINGS[0], random.randrange(2**31))
    getattr(model[0], frozen).requires_grad_(False)
    fim = fisher_fast.diag_fim(model, (x, y), backend=backend, progress=False)
    kept = "bias" if frozen == "weight" else "weight"
    assert f"0.{frozen}" not in fim and f"0.{kept}" in fim
    full = reference_fim(model, x, y)  # the reference also skips frozen parameters
    assert relative_error(fim.flat, full) < 2e-5


class _CrossAttention(nn.Module):
    """Cross attention with different query and key lengths, a padding mask, seq-first layout
    and the attention weights used in the output."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 3)
        self.memory = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, mem = x[:, :3].transpose(0, 1), self.memory(x).transpose(0, 1)
        padding = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        padding[:, -1] = True
        out, weights = self.attn(q, mem, mem, key_padding_mask=padding)
        return out.transpose(0, 1).flatten(1) + weights.flatten(1).sum(1, keepdim=True)


class _MaskedSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]


ATTENTION_SETTINGS = [
    Setting("attention-cross-padding-weights", _CrossAttention, _x(5, 6)),
    Setting("attention-causal", _MaskedSelfAttention, _x(4, 6)),
    Setting("attention-shared", lambda: Twice(_SelfAttention()), _x(4, 6)),
]


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("setting", ATTENTION_SETTINGS, ids=[s.id for s in ATTENTION_SETTINGS])
def test_attention_variants(setting: Setting, backend: str) -> None:
    seed = random.randrange(2**31)
    model, x, y = build(setting, seed)
    fim = fisher_fast.diag_fim(
        model, (x, y), backend=backend, progress=False, on_unsupported="error"
    )
    assert relative_error(fim.flat, reference_fim(model, x, y)) < 2e-5, f"seed {seed}"


@pytest.mark.cuda
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
@pytest.mark.parametrize(
    "setting", SETTINGS + ATTENTION_SETTINGS, ids=[s.id for s in SETTINGS + ATTENTION_SETTINGS]
)
def test_cuda_matches_per_sample_loop(setting: Setting, fisher: str) -> None:
    seed = random.randrange(2**31)
    model, x, y = build(setting, seed)
    ref = reference_fim(model, x, y, fisher=fisher)
    fim = fisher_fast.diag_fim(
        model.cuda(),
        (x.cuda(), y.cuda()),
        fisher=fisher,
        backend="kernels",
        progress=False,
        batch_size=4,
    )
    assert fim.flat.is_cuda
    # TF32 is off by default for float32 matmuls in PyTorch, so float32 rounding applies.
    assert relative_error(fim.flat.cpu(), ref) < 2e-5, f"seed {seed}"


def test_attention_without_weights_uses_the_instrumented_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_recompute(*args: object) -> None:
        raise AssertionError("the batched recompute ran instead of the instrumented forward")

    monkeypatch.setattr("fisher_fast.fim.rules.attention._projection_grads", no_recompute)
    setting = next(s for s in SETTINGS if s.id == "transformer")
    model, x, y = build(setting, random.randrange(2**31))
    fim = fisher_fast.diag_fim(model, (x, y), progress=False, on_unsupported="error")
    assert relative_error(fim.flat, reference_fim(model, x, y)) < 2e-5
    assert "forward" not in vars(model.encoder.self_attn)  # the class's forward is back
