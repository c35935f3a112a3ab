"""The Triton convolution kernels (implicit GEMM and depthwise) against float64 per-sample
weight gradients, and diag_fim(backend='triton') on convolutional models.

Like tests/test_triton_products.py these run in the second environment (``make timm-check``:
Triton's interpreter on the CPU, ``FISHER_FAST_REQUIRE_TRITON=1``), or on a CUDA GPU.
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
from fisher_fast.fim import triton_conv

# name: (N, C, O, H, W, kernel, stride, padding, dilation, groups)
CASES = {
    "3x3": (3, 4, 6, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2-ragged": (2, 5, 20, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "wide-patch": (2, 9, 70, 5, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    "rect-dilated": (2, 3, 5, 8, 9, (2, 3), (1, 2), (2, 0), (2, 1), 1),
    "1x1": (3, 7, 5, 4, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "grouped": (2, 6, 4, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "depthwise": (3, 6, 6, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 6),
    "depthwise-5x5-stride2": (2, 5, 5, 9, 8, (5, 5), (2, 2), (2, 2), (1, 1), 5),
    "depthwise-multiplier": (2, 3, 6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "one-input-channel": (3, 1, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
}


def _reference(
    x: torch.Tensor, g: torch.Tensor, weight_shape: tuple[int, ...], case: tuple
) -> torch.Tensor:
    """(groups, O/groups, C/groups*kh*kw) sum of squared per-sample weight gradients, float64."""
    *_, stride, padding, dilation, groups = case
    total = torch.zeros(weight_shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        grad = torch.nn.grad.conv2d_weight(
            x[n : n + 1].double().cpu(), weight_shape, g[n : n + 1].double().cpu(),
            stride, padding, dilation, groups,
        )  # fmt: skip
        total += grad.square()
    return total.reshape(groups, weight_shape[0] // groups, -1)


def _bound(
    x: torch.Tensor, g: torch.Tensor, weight_shape: tuple[int, ...], case: tuple, unit: float
) -> torch.Tensor:
    """square_sum_bound of the per-sample weight gradients (a sum over the output positions per
    entry), from their float64 values and those of |x| and |g|, shaped as the result."""
    *_, stride, padding, dilation, groups = case

    def per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            torch.nn.grad.conv2d_weight(
                a[n : n + 1].double().cpu(), weight_shape, b[n : n + 1].double().cpu(),
                stride, padding, dilation, groups,
            ).reshape(groups, weight_shape[0] // groups, -1)
            for n in range(a.shape[0])
        ])  # fmt: skip

    positions = g.shape[2] * g.shape[3]
    return square_sum_bound(per_sample(x, g), per_sample(x.abs(), g.abs()), positions, unit)


def _inputs(case: tuple, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    n, c, o, h, w, kernel, stride, padding, dilation, groups = case
    weight_shape = (o, c // groups, *kernel)
    x = torch.randn(n, c, h, w, generator=gen)
    out = torch.nn.functional.conv2d(
        x, torch.zeros(weight_shape), None, stride, padding, dilation, groups
    )
    g = torch.randn(out.shape, generator=gen)
    return x.to(DEVICE), g.to(DEVICE), weight_shape


@needs_triton
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["acc32", "acc64"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_per_sample_gradients(
    name: str, acc: torch.dtype, gen: torch.Generator
) -> None:
    case = CASES[name]
    x, g, weight_shape = _inputs(case, gen)
    *_, kernel, stride, padding, dilation, groups = case
    out = triton_conv.conv2d_square_sum(x, g, kernel, stride, padding, dilation, groups, acc)
    reference = _reference(x, g, weight_shape, case)
    assert out.dtype == acc and out.shape == reference.shape
    err = float((out.double().cpu() - reference).abs().max())
    assert err <= 1e-5 * float(reference.abs().max()), err


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_stays_within_its_derived_bound(name: str, gen: torch.Generator) -> None:
    """precision='bf16': the implicit GEMM rounds its inputs to bfloat16 (to nearest even: it
    gives the float64 sum of torch's bfloat16 roundings within float32's bound), the depthwise
    kernel (one input channel per group) multiplies in float32 whatever the precision."""
    case = CASES[name]
    x, g, weight_shape = _inputs(case, gen)
    *_, kernel, stride, padding, dilation, groups = case
    args = (kernel, stride, padding, dilation, groups, torch.float32)
    out = triton_conv.conv2d_square_sum(x, g, *args, precision="bf16").double().cpu()
    if case[1] // groups == 1:  # the depthwise kernel
        rounded, unit = (x, g), 0.0
    else:
        rounded, unit = (x.bfloat16(), g.bfloat16()), BF16_UNIT
        excess = (out - _reference(x, g, weight_shape, case)).abs()
        excess -= _bound(x, g, weight_shape, case, unit)
        assert float(excess.max()) <= 0, float(excess.max())
    excess = (out - _reference(*rounded, weight_shape, case)).abs()
    excess -= _bound(*rounded, weight_shape, case, 0.0)
    assert float(excess.max()) <= 0, float(excess.max())
    if unit:  # and that is not float32's result
        ieee = triton_conv.conv2d_square_sum(x, g, *args, precision="ieee").double().cpu()
        assert bool(((out - ieee).abs() > 2 * _bound(x, g, weight_shape, case, 0.0)).any())


@needs_triton
@pytest.mark.parametrize("name", ["stride2-ragged", "depthwise"])
def test_bfloat16_inputs_are_multiplied_exactly(name: str, gen: torch.Generator) -> None:
    """A bfloat16 model's input and gradient: exact products in the default precision."""
    case = CASES[name]
    x, g, weight_shape = _inputs(case, gen)
    x, g = x.bfloat16(), g.bfloat16()
    *_, kernel, stride, padding, dilation, groups = case
    out = triton_conv.conv2d_square_sum(
        x, g, kernel, stride, padding, dilation, groups, torch.float32
    )
    excess = (out.double().cpu() - _reference(x, g, weight_shape, case)).abs()
    excess -= _bound(x, g, weight_shape, case, 0.0)
    assert float(excess.max()) <= 0, float(excess.max())


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("name", ["stride2-ragged", "grouped", "depthwise-multiplier"])
def test_split_samples_match_and_repeat(name: str, splits: int, gen: torch.Generator) -> None:
    """Samples split into ranges side by side give the float64 sum, the same bits twice."""
    case = CASES[name]
    x, g, weight_shape = _inputs((3, *case[1:]), gen)
    *_, kernel, stride, padding, dilation, groups = case
    args = (kernel, stride, padding, dilation, groups, torch.float32)
    out = triton_conv.conv2d_square_sum(x, g, *args, splits=splits)
    reference = _reference(x, g, weight_shape, case)
    err = float((out.double().cpu() - reference).abs().max())
    assert err <= 1e-5 * float(reference.abs().max()), err
    assert torch.equal(out, triton_conv.conv2d_square_sum(x, g, *args, splits=splits))


@needs_triton
@pytest.mark.parametrize("name", ["3x3", "depthwise"])
def test_offsets_past_2_to_the_31(name: str, gen: torch.Generator) -> None:
    """Input and gradient samples 2^31 - 2^20 elements apart, split so that a range starts at
    the third sample, past 2^31 elements: its start must not wrap in 32 bits."""
    case = CASES[name]
    x, g, weight_shape = _inputs((3, *case[1:]), gen)
    x, g = samples_far_apart(x), samples_far_apart(g)
    *_, kernel, stride, padding, dilation, groups = case
    out = triton_conv.conv2d_square_sum(
        x, g, kernel, stride, padding, dilation, groups, torch.float32, splits=3
    )
    reference = _reference(x, g, weight_shape, case)
    err = float((out.double().cpu() - reference).abs().max())
    assert err <= 1e-5 * float(reference.abs().max()), err


@needs_triton
def test_agrees_with_the_cpu_op_on_strided_inputs(gen: torch.Generator) -> None:
    """Channels-last input and a sliced gradient are read through their strides, and the result
    equals the compiled CPU op's (same contract) on the same numbers."""
    case = CASES["stride2-ragged"]
    x, g, _ = _inputs(case, gen)
    x = x.contiguous(memory_format=torch.channels_last)
    g = torch.cat([g, g], dim=1)[:, ::2]
    *_, kernel, stride, padding, dilation, groups = case
    out = triton_conv.conv2d_square_sum(
        x, g, kernel, stride, padding, dilation, groups, torch.float64
    )
    cpu = fisher_fast.ops.conv2d_sq_sum(
        x.cpu(), g.cpu(), kernel, stride, padding, dilation, groups, torch.float64
    )
    assert torch.allclose(out.cpu(), cpu, rtol=1e-5, atol=0)


class ConvNet(nn.Module):
    """A stem, a depthwise-separable block with reflect padding and a strided grouped layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect")
        self.pointwise = nn.Conv2d(6, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.pointwise(torch.tanh(self.depthwise(h))))
        return self.head(torch.tanh(self.grouped(h)).mean((2, 3)))


@needs_triton
def test_diag_fim_on_a_convolutional_model(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = CallCounter(monkeypatch, triton_conv, "conv2d_square_sum")
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = ConvNet().to(DEVICE)
    x = torch.randn(7, 2, 8, 8, generator=gen).to(DEVICE)
    y = torch.randint(3, (7,), generator=gen).to(DEVICE)
    fim = fisher_fast.diag_fim(model, (x, y), backend="triton", batch_size=4, progress=False)
    reference = reference_fim(model, x, y).to(fim.flat.device)
    worst = float((fim.flat.double() - reference).abs().max())
    assert worst <= 1e-5 * float(reference.abs().max())
    assert kernel.calls == 8, "four convolutions in each of the two batches"


@needs_triton
def test_refuses_float64_and_mismatched_shapes() -> None:
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    g = torch.randn(2, 6, 5, 5, device=DEVICE)
    args = ((3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(TypeError, match="float64"):
        triton_conv.conv2d_square_sum(x.double(), g.double(), *args, 1, torch.float64)
    with pytest.raises(ValueError, match="groups dividing"):
        triton_conv.conv2d_square_sum(x, g, *args, 4, torch.float32)
    with pytest.raises(ValueError, match=r"x \(N, C, H, W\) and g"):
        triton_conv.conv2d_square_sum(x, g[:1], *args, 1, torch.float32)
