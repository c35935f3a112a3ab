"""The Triton per-sample square-accumulate kernel (backend='triton'), against float64 references.

Triton ships with CUDA builds of torch only, so these run in the second environment (``make
timm-check``: torch 2.14.1, on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1`` set
before fisher_fast is imported); there ``FISHER_FAST_REQUIRE_TRITON=1`` turns a missing Triton
into a failure. The refusals at the end run everywhere.
"""

from __future__ import annotations

import pytest
import torch
from call_counter import CallCounter
from fim_reference import reference_fim
from torch import nn
from triton_helpers import (
    BF16_UNIT,
    DEVICE,
    needs_triton,
    samples_far_apart,
    square_sum_bound,
)

import fisher_fast
from fisher_fast.fim import triton_conv, triton_products


def _reference(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nbto,nbti->nboi", g.double(), x.double()).square().sum(0)


def _bound(g: torch.Tensor, x: torch.Tensor, input_unit: float) -> torch.Tensor:
    """square_sum_bound for g (N, B, T, O) and x (N, B, T, I): (B, O, I), float64."""
    products = torch.einsum("nbto,nbti->nboi", g.double().cpu(), x.double().cpu())
    magnitudes = torch.einsum("nbto,nbti->nboi", g.double().abs().cpu(), x.double().abs().cpu())
    return square_sum_bound(products, magnitudes, g.shape[2], input_unit)


# Relative error allowed per precision: TF32 keeps 10 of float32's 23 mantissa bits, so one
# rounded product is off by up to about 2^-11 and its square by twice that; 3xTF32 and exact
# float32 stay at float32's level. Only a GPU tells them apart (the interpreter computes every
# product in float32). bf16 is checked entry by entry against its derived bound instead
# (triton_helpers.square_sum_bound).
BOUND = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 5e-3}
SHAPES = {
    "tiny": (3, 1, 5, 7, 9),
    "ragged-tiles": (2, 2, 33, 70, 40),
    "whole-tiles": (5, 3, 16, 32, 64),
    "one-position": (4, 1, 1, 3, 5),
}


@needs_triton
@pytest.mark.parametrize("precision", list(BOUND))
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["acc32", "acc64"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_the_float64_products(
    shape: tuple[int, ...], acc: torch.dtype, precision: str, gen: torch.Generator
) -> None:
    n, b, t, o, i = shape
    g = torch.randn(n, b, t, o, generator=gen).to(DEVICE)
    x = torch.randn(n, b, t, i, generator=gen).to(DEVICE)
    out = triton_products.square_sum(g, x, acc, precision)
    reference = _reference(g, x)
    assert out.dtype == acc and out.shape == (b, o, i)
    worst = float((out.double() - reference).abs().max())
    assert worst <= BOUND[precision] * float(reference.abs().max())


@needs_triton
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["acc32", "acc64"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_bf16_stays_within_its_derived_bound_and_rounds_to_nearest_even(
    shape: tuple[int, ...], acc: torch.dtype, gen: torch.Generator
) -> None:
    """Every entry within square_sum_bound of the float64 sum for inputs rounded by 2^-8; and
    within float32's bound of the float64 sum of torch's own bfloat16 roundings of the inputs
    (round to nearest even): the kernel rounds exactly those, and multiplies them exactly."""
    n, b, t, o, i = shape
    g = torch.randn(n, b, t, o, generator=gen).to(DEVICE)
    x = torch.randn(n, b, t, i, generator=gen).to(DEVICE)
    out = triton_products.square_sum(g, x, acc, "bf16").double().cpu()
    assert out.shape == (b, o, i)
    excess = (out - _reference(g, x).cpu()).abs() - _bound(g, x, BF16_UNIT)
    assert float(excess.max()) <= 0, float(excess.max())
    g16, x16 = g.bfloat16(), x.bfloat16()
    excess = (out - _reference(g16, x16).cpu()).abs() - _bound(g16, x16, 0.0)
    assert float(excess.max()) <= 0, float(excess.max())


@needs_triton
@pytest.mark.parametrize("name", ["ragged-tiles", "whole-tiles"])
def test_bf16_differs_from_ieee_by_more_than_float32_rounding(
    name: str, gen: torch.Generator
) -> None:
    """The bf16 option is no silent float32: on random inputs its result is off from the float64
    sum by more than float32 arithmetic can be (square_sum_bound with exact inputs), while ieee
    stays within that; the median entry moves by more than 2^-12 of itself (bfloat16 rounding
    moves products by up to 2^-7; float32 by 2^-23)."""
    n, b, t, o, i = SHAPES[name]
    g = torch.randn(n, b, t, o, generator=gen).to(DEVICE)
    x = torch.randn(n, b, t, i, generator=gen).to(DEVICE)
    ieee = triton_products.square_sum(g, x, torch.float32, "ieee").double().cpu()
    bf16 = triton_products.square_sum(g, x, torch.float32, "bf16").double().cpu()
    reference, float32_bound = _reference(g, x).cpu(), _bound(g, x, 0.0)
    assert bool(((ieee - reference).abs() <= float32_bound).all())
    beyond = (bf16 - reference).abs() > float32_bound
    assert float(beyond.double().mean()) > 0.9, "bf16 is off by more than float32 allows"
    assert bool(((bf16 - ieee).abs() > 2 * float32_bound).any())
    assert float(((bf16 - ieee).abs() / ieee).median()) > 2.0**-12


@needs_triton
@pytest.mark.parametrize("precision", triton_products.PRECISIONS)
def test_bfloat16_inputs_are_multiplied_exactly_in_every_precision(
    precision: str, gen: torch.Generator
) -> None:
    """A bfloat16 model's tensors (and a bfloat16 / float32 pair, taken in float32): products
    of bfloat16 numbers are exact in float32, so every precision gives the float64 sum of the
    same numbers within float32's bound."""
    g = torch.randn(3, 2, 33, 70, generator=gen).to(DEVICE).bfloat16()
    x = torch.randn(3, 2, 33, 40, generator=gen).to(DEVICE).bfloat16()
    for pair in ((g, x), (g, x.float()), (g.float(), x)):
        out = triton_products.square_sum(*pair, torch.float32, precision).double().cpu()
        excess = (out - _reference(g, x).cpu()).abs() - _bound(g, x, 0.0)
        assert float(excess.max()) <= 0, (pair[0].dtype, pair[1].dtype, float(excess.max()))


def test_kernel_precision_takes_bf16_for_bfloat16_inputs() -> None:
    assert triton_products.kernel_precision("ieee", torch.bfloat16) == "bf16"
    assert triton_products.kernel_precision("ieee", torch.float32) == "ieee"
    assert triton_products.kernel_precision("bf16", torch.float16) == "bf16"
    assert triton_products.input_dtype(torch.empty(1).bfloat16(), torch.empty(1).half()) == (
        torch.float32
    )
    with pytest.raises(ValueError, match="triton_precision must be one of"):
        triton_products.kernel_precision("fp32", torch.bfloat16)


@needs_triton
def test_strided_inputs(gen: torch.Generator) -> None:
    """Gradients arrive transposed or sliced; the kernel reads them through their strides."""
    g = torch.randn(3, 2, 40, 18, generator=gen).to(DEVICE).transpose(2, 3)  # (3, 2, 18, 40)
    x = torch.randn(3, 2, 18, 50, generator=gen).to(DEVICE)[..., ::2]  # (3, 2, 18, 25)
    out = triton_products.square_sum(g, x, torch.float32)
    reference = _reference(g, x)
    assert float((out.double() - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


@needs_triton
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["acc32", "acc64"])
@pytest.mark.parametrize("splits", [1, 3, 7, 50], ids=lambda s: f"splits{s}")
def test_split_samples_match_the_float64_products_and_repeat(
    splits: int, acc: torch.dtype, gen: torch.Generator
) -> None:
    """Samples split into ranges side by side (7 samples: ranges of 3, 3, 1; one each; one each,
    50 capped at 7) give the float64 sum, and the same bits on a second run."""
    g = torch.randn(7, 2, 20, 40, generator=gen).to(DEVICE)
    x = torch.randn(7, 2, 20, 33, generator=gen).to(DEVICE)
    out = triton_products.square_sum(g, x, acc, "ieee", splits=splits)
    reference = _reference(g, x)
    assert out.dtype == acc and out.shape == reference.shape
    worst = float((out.double().cpu() - reference.cpu()).abs().max())
    assert worst <= 1e-5 * float(reference.abs().max()), worst
    again = triton_products.square_sum(g, x, acc, "ieee", splits=splits)
    assert torch.equal(out, again), "a second run must give the same bits"


@needs_triton
def test_a_small_layer_is_split_by_default(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tile, 16 samples of 40 positions: 640 // 128 = 5 ranges wanted, 4 of 4 samples."""
    partials = CallCounter(monkeypatch, triton_products, "sum_partials")
    g = torch.randn(16, 1, 40, 30, generator=gen).to(DEVICE)
    x = torch.randn(16, 1, 40, 20, generator=gen).to(DEVICE)
    out = triton_products.square_sum(g, x, torch.float32, "ieee")
    reference = _reference(g, x)
    assert float((out.double().cpu() - reference.cpu()).abs().max()) <= 1e-5 * float(
        reference.abs().max()
    )
    assert partials.calls == 1, "the partial sums of the split grid were added"


def test_plan_splits_fills_the_sms_within_the_workspace() -> None:
    plan = triton_products.plan_splits
    assert plan(132, 256, 49, 4096, 132) == (1, 256), "a full tile grid is not split"
    # A ResNet stem at 224 px, 3 tiles: 88 ranges wanted for two programs per SM, of 3 samples.
    assert plan(3, 256, 12544, 3 * 16384, 132) == (86, 3)
    assert plan(3, 256, 2, 16384, 132)[0] == 4, "each range holds at least 128 positions"
    big = triton_products.WORKSPACE_BYTES // 4
    assert plan(1, 256, 512, big, 132)[0] == 4, "the partials stay within the workspace"
    assert plan(1, 10, 512, 4096, 132) == (10, 1), "no more ranges than samples"
    assert plan(100, 10, 512, 4096, 132, requested=4) == (4, 3)
    assert plan(100, 10, 512, 4096, 132, requested=6) == (5, 2), "no empty range"
    with pytest.raises(ValueError, match="positive"):
        plan(1, 10, 1, 4, 132, requested=0)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3], ids=["whole", "split"])
def test_offsets_past_2_to_the_31(splits: int, gen: torch.Generator) -> None:
    """Samples 2^31 - 2^20 elements apart: the third starts past 2^31 elements (N·T·O past
    2^31, as for a GPT-2 tied head from N = 84 on), which 32-bit offsets wrap."""
    g = samples_far_apart(torch.randn(3, 1, 20, 24, generator=gen).to(DEVICE))
    x = torch.randn(3, 1, 20, 40, generator=gen).to(DEVICE).half()
    out = triton_products.square_sum(g, x, torch.float32, "ieee", splits=splits)
    reference = _reference(g, x)
    worst = float((out.double().cpu() - reference.cpu()).abs().max())
    assert worst <= 1e-5 * float(reference.abs().max()), worst


class SequenceModel(nn.Module):
    """Linear layers on (N, T, D), which call square_sum, after a 1-D convolution (which takes
    the convolution kernels of triton_conv.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.mix, self.head = nn.Linear(8, 20), nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (N, T, 8)
        return self.head(torch.tanh(self.mix(h))).mean(1)


def _sequence_problem(
    gen: torch.Generator, n: int
) -> tuple[SequenceModel, torch.Tensor, torch.Tensor]:
    """A SequenceModel seeded from ``gen`` and n samples (N, 3, 17) with labels, on DEVICE."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = SequenceModel().to(DEVICE)
    x = torch.randn(n, 3, 17, generator=gen).to(DEVICE)
    y = torch.randint(4, (n,), generator=gen).to(DEVICE)
    return model, x, y


@needs_triton
def test_diag_fim_with_the_triton_backend(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = CallCounter(monkeypatch, triton_products, "square_sum")
    model, x, y = _sequence_problem(gen, 10)
    fim = fisher_fast.diag_fim(model, (x, y), backend="triton", batch_size=6, progress=False)
    reference = reference_fim(model, x, y).to(fim.flat.device)
    worst = float((fim.flat.double() - reference).abs().max())
    assert worst <= 1e-5 * float(reference.abs().max())
    assert kernel.calls == 4, "mix and head weights in each of the two batches"


@needs_triton
def test_diag_fim_hands_its_precision_to_every_kernel(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """triton_precision reaches the Linear layers' products and the convolution's kernel."""
    seen: list[object] = []
    for module, name in ((triton_products, "square_sum"), (triton_conv, "conv2d_square_sum")):
        original = getattr(module, name)

        def spy(*args: object, _original: object = original, **kwargs: object) -> object:
            seen.append(kwargs.get("precision", args[-1]))
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(module, name, spy)
    model, x, y = _sequence_problem(gen, 6)
    fim = fisher_fast.diag_fim(
        model, (x, y), backend="triton", triton_precision="tf32x3", progress=False
    )
    reference = reference_fim(model, x, y).to(fim.flat.device)
    assert float((fim.flat.double() - reference).abs().max()) <= 1e-5 * float(reference.max())
    assert seen == ["tf32x3"] * 3, seen  # the convolution, then mix and head


@needs_triton
def test_diag_fim_in_bf16_rounds_every_product_within_its_bound(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """triton_precision='bf16' reaches the convolution's kernel and the Linear layers' products,
    each product stays within its derived bound, and the FIM is not float32's."""
    precisions: list[object] = []
    original = triton_conv.conv2d_square_sum

    def conv_spy(*args: object, **kwargs: object) -> object:
        precisions.append(kwargs["precision"])
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_conv, "conv2d_square_sum", conv_spy)
    model, x, y = _sequence_problem(gen, 6)
    ieee = fisher_fast.diag_fim(
        model, (x, y), backend="triton", triton_precision="ieee", progress=False
    )
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]] = []
    square_sum = triton_products.square_sum

    def products_spy(g: torch.Tensor, x: torch.Tensor, *args: object) -> torch.Tensor:
        out = square_sum(g, x, *args)  # type: ignore[arg-type]
        calls.append((g.detach(), x.detach(), out, args[-1]))
        return out

    monkeypatch.setattr(triton_products, "square_sum", products_spy)
    bf16 = fisher_fast.diag_fim(
        model, (x, y), backend="triton", triton_precision="bf16", progress=False
    )
    assert precisions == ["ieee", "bf16"] and len(calls) == 2, (precisions, len(calls))
    for g, x_in, out, precision in calls:  # mix and head
        assert precision == "bf16" and g.dtype == x_in.dtype == torch.float32
        excess = (out.double().cpu() - _reference(g, x_in).cpu()).abs() - _bound(g, x_in, BF16_UNIT)
        assert float(excess.max()) <= 0, float(excess.max())
    reference = reference_fim(model, x, y).to(ieee.flat.device)
    assert float((ieee.flat.double() - reference).abs().max()) <= 1e-5 * float(reference.max())
    assert float((bf16.flat.double() - reference).abs().max()) > 1e-5 * float(reference.max())


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's transposed Linear (transformers.pytorch_utils.Conv1D, which
    the second environment does not install): y = x W + b with W (I, O), recognised by its
    class name and module as the real one is (rules/transposed_linear.py)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return flat.view(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


class AttentionModel(nn.Module):
    """An embedding Linear, nn.MultiheadAttention (instrumented: no attention weights asked for)
    and a transposed Linear over (N, T, D), then a head on the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = Conv1D(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(torch.tanh(self.mlp(h)).mean(1))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_attention_and_conv1d_hand_a_bfloat16_models_tensors_to_the_kernel(
    dtype: torch.dtype, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 model's attention projections and transposed Linear reach the kernel in
    bfloat16 (exact products, float32 sums: the torch backend, which widens them, gives the
    same FIM within float32 rounding); a float32 model's in float32, as before."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = AttentionModel().to(DEVICE, dtype)
    x = torch.randn(6, 7, 5, generator=gen).to(DEVICE, dtype)
    y = torch.randint(3, (6,), generator=gen).to(DEVICE)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    square_sum = triton_products.square_sum

    def spy(g: torch.Tensor, x_in: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append((g.dtype, x_in.dtype))
        return square_sum(g, x_in, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_products, "square_sum", spy)
    fim = fisher_fast.diag_fim(model, (x, y), backend="triton", progress=False)
    plain = fisher_fast.diag_fim(model, (x, y), backend="torch", progress=False)
    # embed, the four attention products (query, key, value, output) and the Conv1D
    assert seen == [(dtype, dtype)] * 6, seen
    paths = fim.meta["paths"]
    for name in ("attention.in_proj_weight", "attention.out_proj.weight", "mlp.weight"):
        assert paths[name].startswith("rule"), (name, paths[name])
    scale = float(plain.flat.abs().max())
    assert float((fim.flat.double() - plain.flat.double()).abs().max()) <= 1e-5 * scale


def test_the_default_precision_follows_torchs_tf32_flag() -> None:
    flags = torch.backends.cuda.matmul  # a module object monkeypatch cannot restore
    before = flags.allow_tf32
    try:
        for allowed, expected in ((True, "tf32"), (False, "ieee")):
            flags.allow_tf32 = allowed
            assert triton_products.dot_precision() == expected
            assert triton_products.dot_precision("tf32x3") == "tf32x3"
    finally:
        flags.allow_tf32 = before
    with pytest.raises(ValueError, match="triton_precision must be one of"):
        triton_products.dot_precision("fp32")


def test_triton_precision_is_refused_without_the_triton_backend() -> None:
    model = nn.Linear(3, 2)
    data = (torch.randn(4, 3), torch.randint(2, (4,)))
    for backend in ("auto", "kernels", "torch"):
        with pytest.raises(ValueError, match="pass backend='triton'"):
            fisher_fast.diag_fim(
                model, data, backend=backend, triton_precision="ieee", progress=False
            )
    with pytest.raises(ValueError, match="triton_precision must be one of"):
        fisher_fast.diag_fim(model, data, backend="triton", triton_precision="x3", progress=False)


def test_refuses_a_float64_fim_or_a_device_it_cannot_run_on() -> None:
    model = nn.Linear(3, 2)
    data = (torch.randn(4, 3), torch.randint(2, (4,)))
    with pytest.raises(ValueError, match="backend='triton'"):
        fisher_fast.diag_fim(model, data, backend="triton", dtype=torch.float64, progress=False)
    if not triton_products.runs_on(torch.device("cpu")):
        with pytest.raises(ValueError, match=r"backend='triton' (needs Triton|runs on CUDA)"):
            fisher_fast.diag_fim(model, data, backend="triton", progress=False)


@needs_triton
def test_refuses_float64_inputs() -> None:
    g = torch.randn(2, 1, 3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        triton_products.square_sum(g, g, torch.float64)
