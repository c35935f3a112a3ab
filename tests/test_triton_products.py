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
from triton_helpers import DEVICE, needs_triton, samples_far_apart

import fisher_fast
from fisher_fast.fim import triton_conv, triton_products


def _reference(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nbto,nbti->nboi", g.double(), x.double()).square().sum(0)


# Relative error allowed per precision: TF32 keeps 10 of float32's 23 mantissa bits, so one
# rounded product is off by up to about 2^-11 and its square by twice that; 3xTF32 and exact
# float32 stay at float32's level. Only a GPU tells them apart (the interpreter computes every
# product in float32).
BOUND = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 5e-3}


@needs_triton
@pytest.mark.parametrize("precision", list(BOUND))
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["acc32", "acc64"])
@pytest.mark.parametrize(
    "shape",
    [(3, 1, 5, 7, 9), (2, 2, 33, 70, 40), (5, 3, 16, 32, 64), (4, 1, 1, 3, 5)],
    ids=["tiny", "ragged-tiles", "whole-tiles", "one-position"],
)
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


@needs_triton
def test_diag_fim_with_the_triton_backend(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = CallCounter(monkeypatch, triton_products, "square_sum")
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = SequenceModel().to(DEVICE)
    x = torch.randn(10, 3, 17, generator=gen).to(DEVICE)
    y = torch.randint(4, (10,), generator=gen).to(DEVICE)
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
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = SequenceModel().to(DEVICE)
    x = torch.randn(6, 3, 17, generator=gen).to(DEVICE)
    y = torch.randint(4, (6,), generator=gen).to(DEVICE)
    fim = fisher_fast.diag_fim(
        model, (x, y), backend="triton", triton_precision="tf32x3", progress=False
    )
    reference = reference_fim(model, x, y).to(fim.flat.device)
    assert float((fim.flat.double() - reference).abs().max()) <= 1e-5 * float(reference.max())
    assert seen == ["tf32x3"] * 3, seen  # the convolution, then mix and head


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
