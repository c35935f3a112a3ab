"""Parameters used elementwise in their module's own forward (layer-scale gains): traced to
their use and given the sample axis there when verified exact, else the generic path.

Every case is checked against a float64 per-sample loop, in batches of 4 and 3 samples; the
uses that cannot be traced (a matrix product, a reduction over the samples) must be detected
and take the per-sample path, still exact (a value leaving the model: test_fim_relative_bias.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from fim_reference import reference_fim
from torch import nn

import fisher_fast
from fisher_fast.fim.broadcast_params import PATH
from fisher_fast.fim.traced_use import _broadcast_shape, _selection

N, C = 7, 6


class ConvScaleBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, channels-last norm and MLP, then the layer-scale gain
    applied as ``x.mul(gamma.reshape(1, -1, 1, 1))`` before the residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, C)
        self.gamma = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + h.mul(self.gamma.reshape(1, -1, 1, 1))


class TokenScaleBlock(nn.Module):
    """BEiT's block: ``x + gamma_1 * mix(norm(x))``, the gain (C,) broadcast over (N, T, C);
    ``use`` picks another way of using a gain (see the tests)."""

    def __init__(self, use: str = "mul") -> None:
        super().__init__()
        self.use = use
        self.norm, self.mix = nn.LayerNorm(C), nn.Linear(C, C)
        self.gamma_1 = nn.Parameter(torch.rand(C) + 0.5)
        self.gamma_2 = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.norm(x)))
        uses: dict[str, Callable[[], torch.Tensor]] = {
            "mul": lambda: x + self.gamma_1 * h + h / (1 + self.gamma_2.square()),
            "in_place": lambda: x + h.clone().mul_(self.gamma_1) - self.gamma_2,
            "matmul": lambda: x + h @ torch.diag(self.gamma_1) + self.gamma_2 * h,
        }
        return uses[self.use]()


class Escaping(nn.Module):
    """A gain whose scaled copy is the module's output, added to the samples by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.gain


class PositionMLPBlock(nn.Module):
    """Swin V2's continuous position bias, on tokens: an MLP with an in-place ReLU, run on a
    constant table of coordinates (T, 2), whose output (T, C) is added to every sample's
    tokens; ``use`` "constant" instead adds the MLP's output into a constant in place;
    "expanded" expands it to the batch first, copies it and adds it to the tokens in place
    (MPNet's position bias); "repeated" repeats it along axis 0 instead (SigLIP's probe);
    "expanded_flipped" reverses the expanded rows, so that sample i reads row n - 1 - i (the
    same values: still a per-sample model)."""

    def __init__(self, use: str = "mlp", tokens: int = 5) -> None:
        super().__init__()
        self.use = use
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, C))
        self.register_buffer("coords", torch.linspace(-1, 1, 2 * tokens).reshape(tokens, 2))
        self.mix = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.mlp(self.coords)
        if self.use == "constant":
            bias = self.coords.new_zeros(bias.shape).add_(bias)
        elif self.use in ("expanded", "expanded_flipped", "repeated"):
            rows = (
                bias.unsqueeze(0).repeat(x.shape[0], 1, 1)
                if self.use == "repeated"
                else bias.unsqueeze(0).expand(x.shape[0], -1, -1).contiguous()
            )
            h = self.mix(x)
            h += rows.flip(0) if self.use == "expanded_flipped" else rows
            return torch.tanh(h)
        return torch.tanh(self.mix(x) + bias)


class PositionMLPModel(nn.Module):
    def __init__(self, use: str = "mlp") -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(4, C), PositionMLPBlock(use), nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


class WindowMajorBias(nn.Module):
    """A gain returned by its module and added to the tokens by the parent (traced, and not
    contained in its module); then the tokens as windows laid out window after window,
    (W·N, T, C), plus a bias from an MLP on a constant table: that bias's W rows per sample are
    not a block per sample, so the planning batch's gradient check refuses its trace."""

    def __init__(self, windows: int = 2, tokens: int = 3) -> None:
        super().__init__()
        self.windows, self.tokens = windows, tokens
        self.embed, self.gain, self.head = nn.Linear(4, C), Escaping(), nn.Linear(C, 3)
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, C))
        self.register_buffer("coords", torch.linspace(-1, 1, 2 * tokens).reshape(tokens, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, w, t = x.shape[0], self.windows, self.tokens
        h = (self.embed(x) + self.gain(x)).reshape(n, w, t, C).transpose(0, 1)
        h = torch.tanh(h.reshape(w * n, t, C) + self.mlp(self.coords))
        return self.head(h.reshape(w, n, t, C).transpose(0, 1).mean((1, 2)))


class ResponseNormBlock(nn.Module):
    """ConvNeXt V2's global response norm on (N, H, W, C): each channel's spatial norm over its
    mean across channels, then ``x + torch.addcmul(bias, weight, x * x_n)``, both gains
    traced through the addcmul."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, C, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(C))
        self.bias = nn.Parameter(torch.randn(C))
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).permute(0, 2, 3, 1)
        x_g = h.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + 1e-6)
        h = h + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), h * x_n)
        return self.head(torch.tanh(h).mean((1, 2)))


class TokenModel(nn.Module):
    """Token blocks on (N, T, C), or on (T, N, C) with ``sequence_first``."""

    def __init__(self, use: str = "mul", blocks: int = 2, sequence_first: bool = False) -> None:
        super().__init__()
        self.sequence_first = sequence_first
        self.embed = nn.Linear(4, C)
        self.blocks = nn.ModuleList(TokenScaleBlock(use) for _ in range(blocks))
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h.transpose(0, 1) if self.sequence_first else h
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(0 if self.sequence_first else 1))


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, C, 3, padding=1)
        self.block = ConvScaleBlock()
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class InputScale(nn.Module):
    """A gain on the model's input itself, which does not require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class EscapeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.bias, self.head = nn.Linear(4, C), Escaping(), nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.embed(x) + self.bias(x)).mean(1))


class Float32Scale(nn.Module):
    """A float64 model's block computing in float32: a float32 tensor times a 0-dim value of
    the parameter, which torch computes in float32 (a 0-dim operand does not raise the
    precision of a tensor with axes)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.gain.sum()).double()


class Float32ScaleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.scale, self.head = nn.Linear(4, C), Float32Scale(), nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.scale(self.embed(x))).mean(1))


def _check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 4,
    labels: torch.Tensor | None = None,
    **kwargs: object,
) -> fisher_fast.DiagFIM:
    """diag_fim (in two batches by default), asserted exact against the per-sample loop
    (``labels``: the "mc" draws the reference uses)."""
    fim = fisher_fast.diag_fim(
        model, (x, y), progress=False, dtype=torch.float64, batch_size=batch_size, **kwargs
    )
    fisher = str(kwargs.get("fisher", "empirical"))
    reference = reference_fim(model, x, y, fisher=fisher, labels=labels)
    worst = float((fim.flat - reference).abs().max())
    assert worst <= 1e-10 * float(reference.abs().max()), (worst, fim.meta["paths"])
    return fim


def _tokens(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(N, 5, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(3, (N,), generator=gen)


def _seeded(gen: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))


@pytest.mark.parametrize("use", ["mul", "in_place"])
def test_gains_on_tokens_are_traced_and_exact(use: str, gen: torch.Generator) -> None:
    """Two blocks, each with two gains, used through a division and a square too."""
    _seeded(gen)
    model = TokenModel(use).double()
    paths = _check(model, *_tokens(gen)).meta["paths"]
    for i in range(2):
        assert paths[f"blocks.{i}.gamma_1"] == PATH, paths
        assert paths[f"blocks.{i}.gamma_2"] == PATH, paths
    assert paths["blocks.0.mix.weight"] == "rule linear_rule"


def test_convnext_gain_reshaped_to_channels_is_traced(gen: torch.Generator) -> None:
    _seeded(gen)
    model = ConvModel().double()
    x = torch.randn(N, 2, 5, 5, generator=gen, dtype=torch.float64)
    paths = _check(model, x, torch.randint(3, (N,), generator=gen)).meta["paths"]
    assert paths["block.gamma"] == PATH
    assert paths["block.conv_dw.weight"] == "rule conv_rule"


def test_gains_in_an_addcmul_are_traced(gen: torch.Generator) -> None:
    _seeded(gen)
    x = torch.randn(N, 2, 4, 4, generator=gen, dtype=torch.float64)
    paths = _check(ResponseNormBlock().double(), x, torch.randint(3, (N,), generator=gen))
    assert paths.meta["paths"]["weight"] == PATH and paths.meta["paths"]["bias"] == PATH


def test_gain_on_the_input_is_traced(gen: torch.Generator) -> None:
    _seeded(gen)
    model = nn.Sequential(InputScale(), nn.Linear(4, 3)).double()
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    paths = _check(model, x, torch.randint(3, (N,), generator=gen)).meta["paths"]
    assert paths["0.gain"] == PATH


def test_a_0_dim_value_meeting_float32_tensors_computes_in_float32(gen: torch.Generator) -> None:
    """Its expanded view, with axes, would compute the product in float64: the forward would
    then differ from the model's by float32 rounding (about 1e-8 of the FIM)."""
    _seeded(gen)
    paths = _check(Float32ScaleModel().double(), *_tokens(gen)).meta["paths"]
    assert paths["scale.gain"] == PATH


def test_a_matrix_product_is_not_traced(gen: torch.Generator) -> None:
    _seeded(gen)
    model = TokenModel("matmul", blocks=1).double()
    paths = _check(model, *_tokens(gen)).meta["paths"]
    assert paths["blocks.0.gamma_1"] == "per-sample gradients of 'blocks.0' (TokenScaleBlock)"
    # the block is re-run per sample for gamma_1 anyway: gamma_2 joins that re-run
    assert paths["blocks.0.gamma_2"] == paths["blocks.0.gamma_1"]


def test_a_traced_gain_keeps_its_path_beside_another_blocks_re_run(gen: torch.Generator) -> None:
    """Each parameter is traced on its own: a block re-run per sample (a matrix product with
    its gain) does not take another block's traced gains with it."""
    _seeded(gen)
    model = TokenModel("mul").double()
    model.blocks[0].use = "matmul"
    paths = _check(model, *_tokens(gen)).meta["paths"]
    assert paths["blocks.0.gamma_1"] == "per-sample gradients of 'blocks.0' (TokenScaleBlock)"
    assert paths["blocks.1.gamma_1"] == PATH, paths
    assert paths["blocks.1.gamma_2"] == PATH, paths


def test_an_axis_that_merely_equals_the_batch_is_not_taken_for_the_samples(
    gen: torch.Generator,
) -> None:
    """Sequence-first blocks with as many positions (4) as the first batch has samples: the
    gains meet (T, N, C), whose axis 0 has the batch's size but is not the sample axis."""
    _seeded(gen)
    model = TokenModel(blocks=1, sequence_first=True).double()
    x = torch.randn(N, 4, 4, generator=gen, dtype=torch.float64)
    paths = _check(model, x, torch.randint(3, (N,), generator=gen)).meta["paths"]
    assert paths["blocks.0.gamma_1"].startswith("per-sample gradients of 'blocks.0'"), paths


def test_a_gain_leaving_its_module_is_traced_into_the_parent(gen: torch.Generator) -> None:
    """The scaled copy returned by its module is added to the samples by the parent: the trace
    stays open past the module and gives it the sample axis there."""
    _seeded(gen)
    model = EscapeModel().double()
    paths = _check(model, *_tokens(gen)).meta["paths"]
    assert paths["bias.gain"] == PATH, paths


def test_an_mlp_on_a_constant_table_is_traced_from_its_call(gen: torch.Generator) -> None:
    """The MLP's Linears see no sample, so their rule cannot use their calls: their parameters
    are traced together from the MLP's call (the first Linear's value goes into the second),
    through the in-place ReLU, to the tokens they are added to."""
    _seeded(gen)
    model = PositionMLPModel().double()
    paths = _check(model, *_tokens(gen)).meta["paths"]
    for name in ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"):
        assert paths[f"block.{name}"] == PATH, paths
    assert paths["block.mix.weight"] == "rule linear_rule"


@pytest.mark.parametrize("use", ["expanded", "repeated"])
def test_a_value_expanded_to_the_batch_is_given_the_samples_there(
    use: str, gen: torch.Generator
) -> None:
    """Expanded from one row to one per sample and copied (MPNet's position bias), or repeated
    (SigLIP's probe), then added to the tokens in place: the trace gives the value the samples
    at the expansion."""
    _seeded(gen)
    paths = _check(PositionMLPModel(use).double(), *_tokens(gen)).meta["paths"]
    for name in ("mlp.0.weight", "mlp.2.bias"):
        assert paths[f"block.{name}"] == PATH, paths


def test_expanded_rows_that_are_not_one_per_sample_are_refused(gen: torch.Generator) -> None:
    """With the expanded rows reversed, row i is sample n - 1 - i's: the planning batch's
    gradient check refuses the trace, and the block is re-run per sample."""
    _seeded(gen)
    paths = _check(PositionMLPModel("expanded_flipped").double(), *_tokens(gen)).meta["paths"]
    assert paths["block.mlp.0.weight"].startswith("per-sample gradients of 'block'"), paths


def test_a_traced_value_added_into_a_constant_in_place_is_not_traced(
    gen: torch.Generator,
) -> None:
    """The constant would hold traced values without being traced: the block is re-run per
    sample instead."""
    _seeded(gen)
    model = PositionMLPModel("constant").double()
    paths = _check(model, *_tokens(gen)).meta["paths"]
    assert paths["block.mlp.0.weight"].startswith("per-sample gradients of 'block'"), paths


def test_a_refused_lookup_keeps_the_first_plans_traced_parameters(gen: torch.Generator) -> None:
    """The MLP's parameters, found by the first plan, make the second plan's gradient check
    fail: the first plan's traced gain is kept all the same, and the MLP takes the per-sample
    path (the whole model's re-run, as its value meets the samples only there)."""
    _seeded(gen)
    x = torch.randn(N, 6, 4, generator=gen, dtype=torch.float64)
    paths = _check(WindowMajorBias().double(), x, torch.randint(3, (N,), generator=gen))
    paths = paths.meta["paths"]
    assert paths["gain.gain"] == PATH, paths
    assert paths["mlp.0.weight"].startswith("per-sample gradients"), paths


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_every_backward_pass_adds_its_squares(fisher: str, gen: torch.Generator) -> None:
    """One backward pass per class ("exact") or draw ("mc"): each adds its own squares."""
    _seeded(gen)
    model = TokenModel().double()
    x, y = _tokens(gen)
    draws = fisher_fast.sample_labels(model(x), 2, torch.Generator().manual_seed(3))
    fim = _check(
        model, x, y, batch_size=N, labels=draws, fisher=fisher, mc_samples=2,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert fim.meta["paths"]["blocks.1.gamma_1"] == PATH


def test_the_broadcast_shape_of_an_op_is_torchs() -> None:
    """The traced op's broadcast shape (computed without torch.broadcast_shapes) equals torch's
    on random shapes, sizes 0 and 1 included, and is None where torch refuses them."""
    for _ in range(3000):
        shapes = [
            tuple(random.choice([0, 1, 1, 2, 3]) for _ in range(random.randint(0, 4)))
            for _ in range(random.randint(1, 3))
        ]
        try:
            expected: torch.Size | None = torch.broadcast_shapes(*shapes) or None
        except RuntimeError:
            expected = None
        leaves = [torch.empty(s) for s in shapes] + [2.0, None]
        assert _broadcast_shape(leaves) == expected, shapes


def _by_vjp(fn: Callable[..., torch.Tensor], params: dict[str, torch.Tensor], grad: torch.Tensor):
    """Per-sample vector-Jacobian products of ``fn`` at ``params``, one sample at a time."""
    names = sorted(params)
    leaves = [params[k].clone().requires_grad_(True) for k in names]
    out = fn(dict(zip(names, leaves, strict=True)))
    rows = [torch.autograd.grad(out, leaves, g, retain_graph=True) for g in grad]
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(names)}


def test_a_selection_maps_gradients_by_index_add(gen: torch.Generator) -> None:
    """A concatenation with a constant (BEiT's query, zero key and value biases) and a gather
    by a constant index with repeats (a bias table): the map equals the vjp per sample."""
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 5, (7,), generator=gen)
    zeros = torch.zeros(2, dtype=torch.float32)

    def fn(qs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat((qs["a"].t().reshape(-1), zeros, qs["b"][index]))

    grad = torch.randn(3, 21, generator=gen, dtype=torch.float64)
    per_sample = _selection(fn, (21,), ["a", "b"], [a, b])
    assert per_sample is not None
    got, expected = per_sample(grad), _by_vjp(fn, {"a": a, "b": b}, grad)
    for name in ("a", "b"):
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize(
    "fn",
    [
        lambda qs: qs["a"] + 1,
        lambda qs: 2 * qs["a"],
        lambda qs: qs["a"].flip(0) - qs["a"],
        lambda qs: torch.sigmoid(qs["a"]),
        lambda qs: qs["a"][:1] + 1,
    ],
    ids=["plus one", "doubled", "difference", "sigmoid", "one entry plus one"],
)
def test_what_is_not_a_selection_gets_no_selection_map(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], gen: torch.Generator
) -> None:
    """Values computed otherwise than by moving entries are told apart by their codes (the
    vector-Jacobian product serves them instead), on many draws of the codes."""
    a = torch.randn(3, generator=gen, dtype=torch.float64)
    shape = tuple(fn({"a": a}).shape)
    assert all(_selection(fn, shape, ["a"], [a]) is None for _ in range(200))
