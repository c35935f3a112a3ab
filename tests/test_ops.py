"""Tests of the compiled ops (fisher_fast.ops): values against float64 references, input checks,
torch.library.opcheck, and torch.compile.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from fim_values import random_fim

from fisher_fast import frechet_distance, ops
from fisher_fast.distance import distances_from_sums

# frechet_sums


def reference_sums(ref: list[torch.Tensor], others: list[torch.Tensor]) -> torch.Tensor:
    """The (K, 5) result of frechet_sums computed plainly in float64."""

    def invalid(t: torch.Tensor) -> float:
        return float((~((t >= 0) & torch.isfinite(t))).sum())

    flat_ref = torch.cat([t.detach().cpu().reshape(-1).double() for t in ref])
    rows = []
    for k in range(len(others) // len(ref)):
        fim = others[k * len(ref) : (k + 1) * len(ref)]
        flat = torch.cat([t.detach().cpu().reshape(-1).double() for t in fim])
        cross = (flat_ref * flat).sqrt().sum().item()
        rows.append(
            [flat_ref.sum().item(), flat.sum().item(), cross, invalid(flat_ref), invalid(flat)]
        )
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)


# Up to one tensor spanning several of the CPU kernel's 1 MiB groups of blocks (the last short).
SHAPES = [
    [(1,)],
    [(24,)],
    [(1000,)],
    [(3, 5), (7,), (2, 2, 2)],
    [(4096 * 9 + 5,), (33,)],
    [(1024 * 513 + 777,)],
]


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_frechet_sums_match_reference(
    shapes: list[tuple[int, ...]], k: int, dtype: torch.dtype, gen: torch.Generator, device: str
) -> None:
    def fim() -> list[torch.Tensor]:
        return [
            random_fim(s.numel(), gen, dtype, device, zeros=0.2).reshape(s)
            for s in map(torch.Size, shapes)
        ]

    ref = fim()
    others = [t for _ in range(k) for t in fim()]
    got = ops.frechet_sums(ref, others)
    assert got.dtype == torch.float64
    assert got.device == ref[0].device
    torch.testing.assert_close(got.cpu(), reference_sums(ref, others), rtol=1e-13, atol=0)


def test_one_against_many_gives_each_pairs_sums_bitwise_on_cpu(gen: torch.Generator) -> None:
    """Each column of a one-against-K call is the call of that pair alone, to the last bit (the
    CPU kernel adds every pair's block sums in the same order whatever K is)."""
    n = 1024 * 600 + 13
    ref = random_fim(n, gen)
    others = [random_fim(n, gen) for _ in range(3)]
    together = ops.frechet_sums([ref], others)
    alone = torch.cat([ops.frechet_sums([ref], [o]) for o in others])
    assert torch.equal(together, alone)


def test_frechet_sums_count_invalid_entries(gen: torch.Generator, device: str) -> None:
    ref = random_fim(5000, gen, device=device)
    other = random_fim(5000, gen, device=device)
    bad = torch.tensor([-1.0, float("nan"), float("inf"), -float("inf"), -1e-40], device=device)
    at_ref = (torch.randperm(4999, generator=gen)[:3] + 1).to(device)  # index 0 gets -0.0
    at_other = torch.randperm(5000, generator=gen)[:5].to(device)
    ref[at_ref] = bad[:3]
    other[at_other] = bad
    ref[0] = -0.0  # negative zero is a valid (zero) entry
    got = ops.frechet_sums([ref], [other]).cpu()
    assert got[0, 3].item() == 3
    assert got[0, 4].item() == 5


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("trial", range(4))
def test_frechet_sums_count_invalid_entries_anywhere(
    k: int, trial: int, gen: torch.Generator, device: str
) -> None:
    """Invalid entries counted exactly wherever they fall: alone in a block (a NaN among
    finite values, +inf and -inf in one block, a negative subnormal), in the tail of a
    partial vector or block, in the reference and in every other, against a plain count."""
    n = 1024 * 40 + 7  # 41 blocks of the CPU kernel, the last one 7 elements long
    bad = torch.tensor([-1.0, float("nan"), float("inf"), -float("inf"), -1e-40, -0.0])

    def with_bad_entries() -> torch.Tensor:
        fim = random_fim(n, gen, zeros=0.1)
        count = int(torch.randint(0, 12, (), generator=gen))
        where = torch.randperm(n, generator=gen)[:count]
        fim[where] = bad[torch.randint(0, len(bad), (count,), generator=gen)]
        fim[n - 1 - trial] = bad[trial]  # one entry in the tail
        return fim.to(device)

    ref = with_bad_entries()
    others = [with_bad_entries() for _ in range(k)]
    got = ops.frechet_sums([ref], others).cpu()
    want = reference_sums([ref], others)
    torch.testing.assert_close(got[:, 3:], want[:, 3:], rtol=0, atol=0)
    torch.testing.assert_close(got[:, :3], want[:, :3], rtol=1e-13, atol=0, equal_nan=True)


def test_frechet_sums_with_no_others(device: str) -> None:
    got = ops.frechet_sums([torch.ones(3, device=device)], [])
    assert got.shape == (0, 5)
    assert got.dtype == torch.float64


def test_frechet_sums_input_checks() -> None:
    one = torch.ones(4)
    with pytest.raises(RuntimeError, match="the reference list is empty"):
        ops.frechet_sums([], [one])
    with pytest.raises(
        RuntimeError, match="got 3 tensors in 'others', which is not a multiple of the 2"
    ):
        ops.frechet_sums([one, one], [one, one, one])
    with pytest.raises(
        RuntimeError, match="must be float16, bfloat16, float32 or float64, got Int"
    ):
        ops.frechet_sums([one.int()], [one.int()])
    with pytest.raises(RuntimeError, match="all FIM tensors must share one dtype"):
        ops.frechet_sums([one], [one.double()])
    with pytest.raises(RuntimeError, match="every FIM tensor must be contiguous"):
        ops.frechet_sums([torch.ones(2, 3)], [torch.ones(3, 2).t()])
    with pytest.raises(
        RuntimeError, match="tensor 1 of FIM 0 has 3 elements but the reference has 4"
    ):
        ops.frechet_sums([one, one], [one, torch.ones(3)])


# per_sample_sq_sum

# (N, B, T, O, I): one position, several blocks, one output, one sample, a small result whose
# samples the CPU kernel splits between threads, a result of several row tiles (300 rows of 500
# columns), a long sequence (tiles of few rows), and a result large enough that threads own
# tiles of it instead of samples; the last two on either side of the CPU kernel's switch from
# products in registers (up to 16 positions) to micro-kernel calls, with rows and columns that
# leave partial blocks of 4 rows and 16 columns.
PS_SHAPES = [
    (5, 1, 1, 3, 4),
    (7, 3, 2, 4, 5),
    (6, 2, 3, 1, 4),
    (1, 1, 4, 3, 2),
    (300, 2, 5, 16, 12),
    (5, 2, 3, 300, 500),
    (3, 1, 700, 40, 9),
    (4, 3, 6, 130, 300),
    (5, 1, 16, 7, 37),
    (5, 1, 17, 7, 37),
    # one sample's transposed gradient over the chunk buffer: each tile reloads the chunks
    (5, 1, 300, 500, 600),
]


# (input dtype, accumulator dtype) pairs the product-square-sum ops are checked with.
INPUT_ACC_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64),
]


def reference_per_sample_sq_sum(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (g.double().transpose(2, 3) @ x.double()).pow(2).sum(0)


def per_sample_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n, b, t, o, i = shape
    g = torch.randn(n, b, t, o, generator=gen).to(dtype=dtype, device=device)
    x = torch.randn(n, b, t, i, generator=gen).to(dtype=dtype, device=device)
    return g, x


@pytest.mark.parametrize("shape", PS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_per_sample_sq_sum_matches_reference(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    acc_dtype: torch.dtype,
    gen: torch.Generator,
    device: str,
) -> None:
    g, x = per_sample_inputs(shape, dtype, gen, device)
    got = ops.per_sample_sq_sum(g, x, acc_dtype)
    expected = reference_per_sample_sq_sum(g, x)
    assert got.shape == expected.shape
    assert got.dtype == acc_dtype
    # Products run in float32 unless the input is float64 (then in float64): rounding of a
    # T-term product and of the sum over N samples, relative to the largest entry.
    exact = dtype == torch.float64 and acc_dtype == torch.float64
    rtol = 1e-12 if exact else 2e-5
    torch.testing.assert_close(
        got.double().cpu(), expected, rtol=rtol, atol=rtol * expected.abs().max().item()
    )


def test_per_sample_sq_sum_non_contiguous_inputs(gen: torch.Generator, device: str) -> None:
    g, x = per_sample_inputs((9, 2, 3, 4, 5), torch.float32, gen, device)
    x_strided = x.transpose(0, 2).contiguous().transpose(0, 2)
    assert not x_strided.is_contiguous()
    torch.testing.assert_close(
        ops.per_sample_sq_sum(g, x_strided), ops.per_sample_sq_sum(g, x), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "shape",
    [(7, 3, 2, 4, 5), (4, 3, 6, 130, 300), (2, 1, 3, 301, 700), (2, 1, 20, 700, 301)],
    ids=str,
)
def test_per_sample_sq_sum_independent_of_threads(
    threads: int, shape: tuple[int, ...], gen: torch.Generator
) -> None:
    """Whichever way the CPU kernel cuts the work (samples or tiles between threads, the result
    formed as it is or transposed for a layer with fewer inputs than outputs), the sums are the
    float64 reference's."""
    g, x = per_sample_inputs(shape, torch.float64, gen, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = ops.per_sample_sq_sum(g, x, torch.float64)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, reference_per_sample_sq_sum(g, x), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "shape",
    # samples split between threads (a small result); tiles owned by threads, as it is and
    # transposed (fewer inputs than outputs); more positions than are summed in registers
    [(7, 3, 2, 4, 5), (4, 1, 6, 700, 300), (4, 1, 6, 300, 700), (3, 2, 40, 130, 90)],
    ids=str,
)
@pytest.mark.parametrize("dtype, acc_dtype", INPUT_ACC_DTYPES)
def test_per_sample_sq_sum_in_place_adds_to_the_accumulator(
    shape: tuple[int, ...], dtype: torch.dtype, acc_dtype: torch.dtype, gen: torch.Generator
) -> None:
    g, x = per_sample_inputs(shape, dtype, gen, "cpu")
    start = torch.rand(shape[1], shape[3], shape[4], generator=gen, dtype=acc_dtype)
    acc = start.clone()
    ops.per_sample_sq_sum_(acc, g, x)
    expected = start.double() + reference_per_sample_sq_sum(g, x)
    rtol = 1e-12 if dtype == acc_dtype == torch.float64 else 2e-5
    torch.testing.assert_close(acc.double(), expected, rtol=rtol, atol=rtol * expected.max().item())


def test_per_sample_sq_sum_in_place_of_gradients_stored_positions_innermost(
    gen: torch.Generator,
) -> None:
    g_t = torch.randn(5, 1, 300, 9, generator=gen, dtype=torch.float64)  # (N, B, O, T)
    g, x = g_t.transpose(2, 3), torch.randn(5, 1, 9, 200, generator=gen, dtype=torch.float64)
    acc = torch.ones(300, 200, dtype=torch.float64)  # a weight-shaped accumulator
    ops.per_sample_sq_sum_(acc, g, x)
    torch.testing.assert_close(acc, 1 + reference_per_sample_sq_sum(g, x)[0], rtol=1e-12, atol=0)


def test_per_sample_sq_sum_in_place_input_checks() -> None:
    g, x = torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 5)
    with pytest.raises(RuntimeError, match="acc must be float32 or float64, got Half"):
        ops.per_sample_sq_sum_(torch.zeros(4, 5, dtype=torch.float16), g, x)
    with pytest.raises(RuntimeError, match=r"acc has 21 elements but g .* give 20 \(B \* O \* I\)"):
        ops.per_sample_sq_sum_(torch.zeros(3, 7), g, x)
    with pytest.raises(RuntimeError, match="acc must be contiguous"):
        ops.per_sample_sq_sum_(torch.zeros(5, 4).t(), g, x)
    with pytest.raises(RuntimeError, match="g and x must share one dtype"):
        ops.per_sample_sq_sum_(torch.zeros(4, 5), g, x.double())
    acc = torch.full((4, 5), 3.0)
    ops.per_sample_sq_sum_(acc, g[:0], x[:0])  # no samples: nothing to add
    assert bool((acc == 3).all())


@pytest.mark.parametrize("empty", ["positions", "outputs", "inputs"])
def test_per_sample_sq_sum_of_empty_axes(empty: str) -> None:
    """No positions give zeros; no outputs or inputs give an empty result of the right shape."""
    t, o, i = (
        (0 if empty == "positions" else 3),
        (0 if empty == "outputs" else 4),
        (0 if empty == "inputs" else 5),
    )
    got = ops.per_sample_sq_sum(torch.ones(2, 1, t, o), torch.ones(2, 1, t, i), torch.float32)
    assert got.shape == (1, o, i)
    assert not got.any()


@pytest.mark.parametrize(
    "shape", [(6, 2, 5, 7, 9), (3, 1, 40, 300, 500), (3, 2, 5, 300, 500)], ids=str
)
def test_per_sample_sq_sum_of_gradients_stored_positions_innermost(
    shape: tuple[int, ...], gen: torch.Generator, device: str
) -> None:
    """A gradient stored (N, B, O, T) and viewed as (N, B, T, O), as a language model's loss over
    transposed logits gives it, is read in place by the CPU kernel: same sums."""
    g, x = per_sample_inputs(shape, torch.float64, gen, device)
    stored = g.transpose(2, 3).contiguous().transpose(2, 3)
    assert stored.transpose(2, 3).is_contiguous() and not stored.is_contiguous()
    torch.testing.assert_close(
        ops.per_sample_sq_sum(stored, x, torch.float64).cpu(),
        reference_per_sample_sq_sum(g, x),
        rtol=1e-12,
        atol=0,
    )


def test_per_sample_sq_sum_of_no_samples(device: str) -> None:
    g = torch.zeros(0, 2, 3, 4, device=device)
    x = torch.zeros(0, 2, 3, 5, device=device)
    got = ops.per_sample_sq_sum(g, x, torch.float64)
    assert got.shape == (2, 4, 5)
    assert got.dtype == torch.float64
    assert not got.any()


def test_per_sample_sq_sum_input_checks() -> None:
    g, x = torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 5)
    with pytest.raises(
        RuntimeError, match=r"g and x must be 4-D \(N, B, T, O\) and \(N, B, T, I\)"
    ):
        ops.per_sample_sq_sum(g[0], x[0])
    with pytest.raises(RuntimeError, match="must agree in samples, blocks and positions"):
        ops.per_sample_sq_sum(g, torch.ones(2, 1, 2, 5))
    with pytest.raises(RuntimeError, match="g must be float16, bfloat16, float32 or float64"):
        ops.per_sample_sq_sum(g.long(), x.long())
    with pytest.raises(RuntimeError, match="g and x must share one dtype"):
        ops.per_sample_sq_sum(g, x.double())
    with pytest.raises(RuntimeError, match="acc_dtype must be float32 or float64, got Half"):
        ops.per_sample_sq_sum(g, x, torch.float16)


# conv2d_sq_sum (CPU only)


class ConvCase(NamedTuple):
    """A 2-D convolution's geometry and batch: x (n, c, h, w), output gradient (n, out, ...)."""

    n: int
    c: int
    hw: tuple[int, int]
    out: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


# 3x3 same-size, 1x1 (the input is the patch matrix), strides, dilation, groups, depthwise, padding
# wider than the kernel reach, one sample, and a batch large enough for several tiles and threads.
CONV_CASES = [
    ConvCase(5, 3, (8, 8), 4, (3, 3), padding=(1, 1)),
    ConvCase(3, 5, (4, 6), 7, (1, 1)),
    ConvCase(4, 3, (7, 7), 2, (1, 1), stride=(2, 2)),
    ConvCase(4, 6, (9, 7), 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    ConvCase(6, 8, (6, 6), 8, (3, 3), stride=(2, 2), padding=(2, 1), dilation=(2, 1), groups=8),
    ConvCase(2, 2, (3, 3), 3, (2, 2), padding=(3, 2)),
    ConvCase(1, 2, (5, 1), 3, (3, 1), padding=(1, 0)),
    ConvCase(70, 40, (6, 6), 48, (3, 3), padding=(1, 1)),
    # late layers' few positions (summed in registers) over more samples than one register
    # group: output channels that end in a partial vector, and a result large enough in float64
    # for threads to own tiles rather than samples
    ConvCase(37, 24, (4, 4), 37, (3, 3), stride=(2, 2), padding=(1, 1)),
    ConvCase(20, 64, (2, 2), 128, (3, 3), padding=(1, 1)),
    # depthwise (the direct path): a late layer's 2x2 with a 5x5 kernel, stride and dilation,
    # padding wider than the reach, 1x1, enough channels for every thread, and channel blocks
    # of 16 with a partial last one (40 = 16 + 16 + 8) on a 7x7 kernel over 4x4 outputs
    ConvCase(5, 6, (2, 2), 6, (5, 5), padding=(2, 2), groups=6),
    ConvCase(3, 4, (7, 6), 4, (3, 3), stride=(2, 3), padding=(1, 0), dilation=(1, 2), groups=4),
    ConvCase(2, 3, (3, 3), 3, (2, 2), padding=(3, 1), groups=3),
    ConvCase(4, 5, (4, 4), 5, (1, 1), groups=5),
    ConvCase(9, 64, (5, 5), 64, (3, 3), padding=(1, 1), groups=64),
    ConvCase(3, 40, (4, 4), 40, (7, 7), padding=(3, 3), groups=40),
]


def conv_inputs(
    case: ConvCase, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x and a random gradient with the shape of the convolution's output."""
    x = torch.randn(case.n, case.c, *case.hw, generator=gen)
    weight = torch.zeros(case.out, case.c // case.groups, *case.kernel)
    y = F.conv2d(x, weight, None, case.stride, case.padding, case.dilation, case.groups)
    return x.to(dtype), torch.randn(y.shape, generator=gen).to(dtype)


def conv_args(case: ConvCase) -> tuple:
    return case.kernel, case.stride, case.padding, case.dilation, case.groups


def reference_conv2d_sq_sum(x: torch.Tensor, g: torch.Tensor, case: ConvCase) -> torch.Tensor:
    """Per-sample weight gradients from float64 autograd, squared and summed."""
    weight = torch.zeros(case.out, case.c // case.groups, *case.kernel, dtype=torch.float64)
    total = torch.zeros_like(weight)
    for xi, gi in zip(x.double(), g.double(), strict=True):
        w = weight.clone().requires_grad_()
        y = F.conv2d(xi[None], w, None, case.stride, case.padding, case.dilation, case.groups)
        (grad,) = torch.autograd.grad(y, w, gi[None])
        total += grad.square()
    return total.reshape(case.groups, case.out // case.groups, -1)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype, acc_dtype", INPUT_ACC_DTYPES)
def test_conv2d_sq_sum_matches_reference(
    case: ConvCase, dtype: torch.dtype, acc_dtype: torch.dtype, gen: torch.Generator
) -> None:
    x, g = conv_inputs(case, dtype, gen)
    got = ops.conv2d_sq_sum(x, g, *conv_args(case), acc_dtype)
    assert got.dtype == acc_dtype
    # Each per-sample product is a sum over positions that may cancel; its rounding error is
    # bounded relative to the same sum of absolute values, so the squares are compared to that.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    error = (got.double() - reference_conv2d_sq_sum(x, g, case)).abs()
    bound = rtol * reference_conv2d_sq_sum(x.abs(), g.abs(), case)
    assert bool((error <= bound).all()), f"worst error over bound {(error / bound).max():.3g}"


@pytest.mark.parametrize("threads", [1, 3])
def test_conv2d_sq_sum_independent_of_threads(threads: int, gen: torch.Generator) -> None:
    case = CONV_CASES[-1]
    x, g = conv_inputs(case, torch.float64, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = ops.conv2d_sq_sum(x, g, *conv_args(case), torch.float64)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, reference_conv2d_sq_sum(x, g, case), rtol=1e-12, atol=0)


def test_conv2d_sq_sum_non_contiguous_inputs(gen: torch.Generator) -> None:
    case = CONV_CASES[0]
    x, g = conv_inputs(case, torch.float32, gen)
    channels_last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        ops.conv2d_sq_sum(channels_last, g, *conv_args(case)),
        ops.conv2d_sq_sum(x, g, *conv_args(case)),
        rtol=1e-6,
        atol=0,
    )


def test_conv2d_sq_sum_of_no_samples() -> None:
    got = ops.conv2d_sq_sum(
        torch.zeros(0, 4, 5, 5), torch.zeros(0, 6, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 2
    )
    assert got.shape == (2, 3, 18)
    assert not got.any()


def test_conv2d_sq_sum_input_checks() -> None:
    x, g = torch.ones(2, 4, 5, 5), torch.ones(2, 6, 3, 3)
    geometry = ((3, 3), (1, 1), (0, 0), (1, 1))
    with pytest.raises(RuntimeError, match=r"x and g must be 4-D \(N, C, H, W\)"):
        ops.conv2d_sq_sum(x[0], g[0], *geometry, 1)
    with pytest.raises(RuntimeError, match="must have the same number of samples"):
        ops.conv2d_sq_sum(x, g[:1], *geometry, 1)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        ops.conv2d_sq_sum(x.long(), g.long(), *geometry, 1)
    with pytest.raises(RuntimeError, match="x and g must share one dtype"):
        ops.conv2d_sq_sum(x, g.double(), *geometry, 1)
    with pytest.raises(RuntimeError, match=r"groups \(3\) must divide"):
        ops.conv2d_sq_sum(x, g, *geometry, 3)
    with pytest.raises(RuntimeError, match="must be positive and padding nonnegative"):
        ops.conv2d_sq_sum(x, g, (3, 3), (0, 1), (0, 0), (1, 1), 1)
    with pytest.raises(RuntimeError, match="acc_dtype must be float32 or float64, got Half"):
        ops.conv2d_sq_sum(x, g, *geometry, 1, torch.float16)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype, acc_dtype", INPUT_ACC_DTYPES)
def test_conv2d_sq_sum_in_place_adds_to_the_accumulator(
    case: ConvCase, dtype: torch.dtype, acc_dtype: torch.dtype, gen: torch.Generator
) -> None:
    x, g = conv_inputs(case, dtype, gen)
    weight_shape = (case.out, case.c // case.groups, *case.kernel)
    start = torch.rand(weight_shape, generator=gen, dtype=acc_dtype)
    acc = start.clone()
    ops.conv2d_sq_sum_(acc, x, g, *conv_args(case))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    reference = reference_conv2d_sq_sum(x, g, case).reshape(weight_shape)
    error = (acc.double() - start.double() - reference).abs()
    bound = rtol * reference_conv2d_sq_sum(x.abs(), g.abs(), case).reshape(weight_shape)
    bound += 1e-7 if acc_dtype == torch.float32 else 1e-15  # rounding of the start values
    assert bool((error <= bound).all()), f"worst error over bound {(error / bound).max():.3g}"


def test_conv2d_sq_sum_in_place_input_checks() -> None:
    x, g = torch.ones(2, 4, 5, 5), torch.ones(2, 6, 3, 3)
    geometry = ((3, 3), (1, 1), (0, 0), (1, 1))
    with pytest.raises(RuntimeError, match="acc must be float32 or float64, got Half"):
        ops.conv2d_sq_sum_(torch.zeros(6, 2, 3, 3, dtype=torch.float16), x, g, *geometry, 2)
    with pytest.raises(RuntimeError, match="acc has 100 elements but the weight of this"):
        ops.conv2d_sq_sum_(torch.zeros(100), x, g, *geometry, 2)
    with pytest.raises(RuntimeError, match="acc must be contiguous"):
        ops.conv2d_sq_sum_(torch.zeros(36, 3).t(), x, g, *geometry, 2)
    with pytest.raises(RuntimeError, match=r"groups \(3\) must divide"):
        ops.conv2d_sq_sum_(torch.zeros(6, 2, 3, 3), x, g, *geometry, 3)
    acc = torch.full((6, 2, 3, 3), 2.0)
    ops.conv2d_sq_sum_(acc, x[:0], g[:0], *geometry, 2)  # no samples: nothing to add
    assert bool((acc == 2).all())


# conv2d_residual_sq_sum_ (CPU only, in place)


def residual_terms(
    case: ConvCase, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random shift and scale (n, out) and basis (the weight's shape)."""
    shift = torch.randn(case.n, case.out, generator=gen).to(dtype)
    scale = torch.randn(case.n, case.out, generator=gen).to(dtype)
    basis = torch.randn(case.out, case.c // case.groups, *case.kernel, generator=gen).to(dtype)
    return shift, scale, basis


def reference_residual_sq_sum(
    x: torch.Tensor,
    g: torch.Tensor,
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    case: ConvCase,
    magnitude: bool = False,
) -> torch.Tensor:
    """Σ_n (dW_n - shift_n - scale_n ⊙ basis)² in float64 from autograd's per-sample
    gradients, (out, rest); with ``magnitude``, the same of |dW_n|-like bounds
    (|x|, |g| and the terms' absolute values, added), the scale of each residual's rounding."""
    shift, scale, basis = (t.double().abs() if magnitude else t.double() for t in terms)
    weight = torch.zeros(case.out, case.c // case.groups, *case.kernel, dtype=torch.float64)
    total = torch.zeros(case.out, basis[0].numel(), dtype=torch.float64)
    xs, gs = (x.double().abs(), g.double().abs()) if magnitude else (x.double(), g.double())
    sign = 1 if magnitude else -1
    for n, (xi, gi) in enumerate(zip(xs, gs, strict=True)):
        w = weight.clone().requires_grad_()
        y = F.conv2d(xi[None], w, None, case.stride, case.padding, case.dilation, case.groups)
        (grad,) = torch.autograd.grad(y, w, gi[None])
        correction = shift[n, :, None] + scale[n, :, None] * basis.reshape(case.out, -1)
        total += (grad.reshape(case.out, -1) + sign * correction).square()
    return total


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype, acc_dtype", INPUT_ACC_DTYPES)
def test_conv2d_residual_sq_sum_matches_reference(
    case: ConvCase, dtype: torch.dtype, acc_dtype: torch.dtype, gen: torch.Generator
) -> None:
    """Every path of the kernel (registers for few positions, the micro-kernel, a depthwise
    layer, which takes the tiled path here) adds the squared residuals to what acc holds."""
    x, g = conv_inputs(case, dtype, gen)
    terms = residual_terms(case, dtype, gen)
    start = torch.rand(
        case.out, case.c // case.groups, *case.kernel, generator=gen, dtype=acc_dtype
    )
    acc = start.clone()
    ops.conv2d_residual_sq_sum_(acc, x, g, *terms, *conv_args(case))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    error = (acc.double() - start.double()).reshape(case.out, -1)
    error = (error - reference_residual_sq_sum(x, g, terms, case)).abs()
    bound = rtol * reference_residual_sq_sum(x, g, terms, case, magnitude=True)
    bound += 1e-7 if acc_dtype == torch.float32 else 1e-15  # rounding of the start values
    assert bool((error <= bound).all()), f"worst error over bound {(error / bound).max():.3g}"


@pytest.mark.parametrize("threads", [1, 3])
def test_conv2d_residual_sq_sum_independent_of_threads(threads: int, gen: torch.Generator) -> None:
    case = CONV_CASES[-1]
    x, g = conv_inputs(case, torch.float64, gen)
    terms = residual_terms(case, torch.float64, gen)
    acc = torch.zeros(case.out, case.c // case.groups, *case.kernel, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ops.conv2d_residual_sq_sum_(acc, x, g, *terms, *conv_args(case))
    finally:
        torch.set_num_threads(before)
    reference = reference_residual_sq_sum(x, g, terms, case)
    torch.testing.assert_close(acc.reshape(case.out, -1), reference, rtol=1e-12, atol=0)


def test_conv2d_residual_sq_sum_input_checks() -> None:
    x, g = torch.ones(2, 4, 5, 5), torch.ones(2, 6, 3, 3)
    acc, shift, basis = torch.zeros(6, 2, 3, 3), torch.ones(2, 6), torch.ones(6, 2, 3, 3)
    geometry = ((3, 3), (1, 1), (0, 0), (1, 1), 2)
    with pytest.raises(RuntimeError, match=r"shift has shape \[2, 5\] but g .* needs \(N, O\)"):
        ops.conv2d_residual_sq_sum_(acc, x, g, shift[:, :5], shift, basis, *geometry)
    with pytest.raises(RuntimeError, match=r"scale has shape \[12\] but g"):
        ops.conv2d_residual_sq_sum_(acc, x, g, shift, shift.reshape(-1), basis, *geometry)
    with pytest.raises(RuntimeError, match="scale must be float16, bfloat16, float32 or float64"):
        ops.conv2d_residual_sq_sum_(acc, x, g, shift, shift.long(), basis, *geometry)
    with pytest.raises(RuntimeError, match="basis has 107 elements but the weight of this"):
        ops.conv2d_residual_sq_sum_(acc, x, g, shift, shift, torch.ones(107), *geometry)
    with pytest.raises(RuntimeError, match="acc has 100 elements but the weight of this"):
        ops.conv2d_residual_sq_sum_(torch.zeros(100), x, g, shift, shift, basis, *geometry)
    ops.conv2d_residual_sq_sum_(acc, x[:0], g[:0], shift[:0], shift[:0], basis, *geometry)
    assert not acc.any()  # no samples: nothing to add


# linear_sq_sum_ (CPU only, in place)


def reference_linear_sq_sum(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight and bias gradients of a linear layer, squared and summed, in float64."""
    g64, x64 = g.double(), x.double()
    weight = sum(torch.outer(gn, xn).square() for gn, xn in zip(g64, x64, strict=True))
    return weight, g64.square().sum(0)


@pytest.mark.parametrize(
    "n, out_f, in_f", [(1, 1, 1), (7, 5, 3), (64, 33, 130)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("dtype, acc_dtype", [*INPUT_ACC_DTYPES, (torch.float16, torch.float64)])
def test_linear_sq_sum_matches_reference(
    n: int, out_f: int, in_f: int, dtype: torch.dtype, acc_dtype: torch.dtype, gen: torch.Generator
) -> None:
    g = torch.randn(n, out_f, generator=gen).to(dtype)
    x = torch.randn(n, in_f, generator=gen).to(dtype)
    start_w = torch.rand(out_f, in_f, generator=gen, dtype=acc_dtype)
    start_b = torch.rand(out_f, generator=gen, dtype=acc_dtype)
    weight, bias = start_w.clone(), start_b.clone()
    ops.linear_sq_sum_(weight, bias, g, x)
    want_w, want_b = reference_linear_sq_sum(g, x)
    rtol = 1e-5 if acc_dtype == torch.float32 else 1e-12
    torch.testing.assert_close(weight.double(), start_w.double() + want_w, rtol=rtol, atol=0)
    torch.testing.assert_close(bias.double(), start_b.double() + want_b, rtol=rtol, atol=0)


def test_linear_sq_sum_one_accumulator_at_a_time(gen: torch.Generator) -> None:
    g, x = torch.randn(9, 4, generator=gen), torch.randn(9, 6, generator=gen)
    want_w, want_b = reference_linear_sq_sum(g, x)
    weight, bias = torch.zeros(4, 6), torch.zeros(4)
    ops.linear_sq_sum_(weight, None, g, x)
    ops.linear_sq_sum_(None, bias, g, x)
    torch.testing.assert_close(weight.double(), want_w, rtol=1e-5, atol=0)
    torch.testing.assert_close(bias.double(), want_b, rtol=1e-5, atol=0)


def test_linear_sq_sum_of_given_squares(gen: torch.Generator) -> None:
    """With g_squared, g is taken as g∘g already (e.g. summed over backward passes)."""
    g2 = torch.rand(9, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    weight, bias = torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    ops.linear_sq_sum_(weight, bias, g2, x, g_squared=True)
    torch.testing.assert_close(weight, g2.t() @ x.square(), rtol=1e-12, atol=0)
    torch.testing.assert_close(bias, g2.sum(0), rtol=1e-12, atol=0)


def test_linear_sq_sum_in_chunks_and_threads(gen: torch.Generator) -> None:
    """A batch whose squares exceed the 16 MiB workspace is taken in chunks of samples; the
    result does not depend on the chunking or the number of threads."""
    n, out_f, in_f = 700, 1000, 2100  # 700 * 3100 float64 squares: 17.4 MB
    g = torch.randn(n, out_f, generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    want = g.square().t() @ x.square()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weight = torch.zeros(out_f, in_f, dtype=torch.float64)
            ops.linear_sq_sum_(weight, None, g, x)
            torch.testing.assert_close(weight, want, rtol=1e-12, atol=0)
    finally:
        torch.set_num_threads(before)


def test_linear_sq_sum_non_contiguous_inputs(gen: torch.Generator) -> None:
    g = torch.randn(5, 8, generator=gen).t()  # (8, 5) with strides (1, 8)
    x = torch.randn(3, 8, generator=gen).t()
    weight, bias = torch.zeros(5, 3), torch.zeros(5)
    ops.linear_sq_sum_(weight, bias, g, x)
    want_w, want_b = reference_linear_sq_sum(g, x)
    torch.testing.assert_close(weight.double(), want_w, rtol=1e-5, atol=0)
    torch.testing.assert_close(bias.double(), want_b, rtol=1e-5, atol=0)


def test_linear_sq_sum_of_no_samples() -> None:
    weight, bias = torch.ones(2, 3), torch.ones(2)
    ops.linear_sq_sum_(weight, bias, torch.zeros(0, 2), torch.zeros(0, 3))
    assert bool((weight == 1).all()) and bool((bias == 1).all())


def test_linear_sq_sum_input_checks() -> None:
    g, x, w, b = torch.ones(4, 2), torch.ones(4, 3), torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"g and x must be 2-D \(N, O\) and \(N, I\)"):
        ops.linear_sq_sum_(w, b, g[None], x)
    with pytest.raises(RuntimeError, match="must have the same number of samples"):
        ops.linear_sq_sum_(w, b, g, x[:3])
    with pytest.raises(RuntimeError, match="g must be float16, bfloat16, float32 or float64"):
        ops.linear_sq_sum_(w, b, g.long(), x.long())
    with pytest.raises(RuntimeError, match="g and x must share one dtype"):
        ops.linear_sq_sum_(w, b, g, x.double())
    with pytest.raises(RuntimeError, match="nothing to accumulate"):
        ops.linear_sq_sum_(None, None, g, x)
    with pytest.raises(RuntimeError, match="accumulators must be float32 or float64, got Half"):
        ops.linear_sq_sum_(w.half(), None, g, x)
    with pytest.raises(RuntimeError, match=r"weight_acc has shape \[3, 2\] but g and x need"):
        ops.linear_sq_sum_(w.t().contiguous(), None, g, x)
    with pytest.raises(RuntimeError, match=r"bias_acc has shape \[3\] but g needs \(2,\)"):
        ops.linear_sq_sum_(None, torch.zeros(3), g, x)
    with pytest.raises(RuntimeError, match="weight_acc and bias_acc must share one dtype"):
        ops.linear_sq_sum_(w, b.double(), g, x)


# Operator registration: schema, fake (meta) implementations, torch.compile


def frechet_samples(gen: torch.Generator, device: str) -> list[tuple]:
    def fims(shapes, k, dtype):
        ref = [random_fim(torch.Size(s).numel(), gen, dtype, device).reshape(s) for s in shapes]
        others = [
            random_fim(torch.Size(s).numel(), gen, dtype, device).reshape(s)
            for _ in range(k)
            for s in shapes
        ]
        return ref, others

    return [
        fims([(10,)], 1, torch.float32),
        fims([(3, 4), (5,), (1, 2, 3)], 2, torch.float64),
        fims([(100,)], 4, torch.bfloat16),
        fims([(7,)], 0, torch.float16),
    ]


def test_opcheck_frechet_sums(gen: torch.Generator, device: str) -> None:
    for sample in frechet_samples(gen, device):
        torch.library.opcheck(torch.ops.fisher_fast.frechet_sums.default, sample)


def test_opcheck_per_sample_sq_sum(gen: torch.Generator, device: str) -> None:
    for shape, dtype, acc in [
        (PS_SHAPES[0], torch.float32, torch.float32),
        (PS_SHAPES[1], torch.float64, torch.float64),
        (PS_SHAPES[2], torch.bfloat16, torch.float32),
        (PS_SHAPES[3], torch.float32, torch.float64),
    ]:
        g, x = per_sample_inputs(shape, dtype, gen, device)
        torch.library.opcheck(torch.ops.fisher_fast.per_sample_sq_sum.default, (g, x, acc))


def test_opcheck_conv2d_sq_sum(gen: torch.Generator) -> None:
    for case, dtype, acc in [
        (CONV_CASES[0], torch.float32, torch.float32),
        (CONV_CASES[3], torch.float64, torch.float64),
        (CONV_CASES[1], torch.bfloat16, torch.float32),
    ]:
        x, g = conv_inputs(case, dtype, gen)
        kernel, stride, padding, dilation, groups = conv_args(case)
        torch.library.opcheck(
            torch.ops.fisher_fast.conv2d_sq_sum.default,
            (x, g, list(kernel), list(stride), list(padding), list(dilation), groups, acc),
        )


def test_opcheck_sq_sums_in_place(gen: torch.Generator) -> None:
    for shape, dtype, acc in [
        (PS_SHAPES[0], torch.float32, torch.float32),
        (PS_SHAPES[1], torch.float64, torch.float64),
        (PS_SHAPES[3], torch.bfloat16, torch.float64),
    ]:
        g, x = per_sample_inputs(shape, dtype, gen, "cpu")
        total = torch.zeros(shape[1], shape[3], shape[4], dtype=acc)
        torch.library.opcheck(torch.ops.fisher_fast.per_sample_sq_sum_.default, (total, g, x))
    for case, dtype, acc in [
        (CONV_CASES[0], torch.float32, torch.float32),
        (CONV_CASES[3], torch.float64, torch.float64),
    ]:
        x, g = conv_inputs(case, dtype, gen)
        kernel, stride, padding, dilation, groups = conv_args(case)
        total = torch.zeros(case.out, case.c // groups, *kernel, dtype=acc)
        geometry = (list(kernel), list(stride), list(padding), list(dilation), groups)
        torch.library.opcheck(
            torch.ops.fisher_fast.conv2d_sq_sum_.default, (total, x, g, *geometry)
        )
        terms = residual_terms(case, dtype, gen)
        torch.library.opcheck(
            torch.ops.fisher_fast.conv2d_residual_sq_sum_.default, (total, x, g, *terms, *geometry)
        )


def test_opcheck_linear_sq_sum(gen: torch.Generator) -> None:
    for dtype, acc, with_weight, with_bias in [
        (torch.float32, torch.float32, True, True),
        (torch.float64, torch.float64, True, False),
        (torch.bfloat16, torch.float32, False, True),
    ]:
        g, x = (
            torch.randn(6, 4, generator=gen).to(dtype),
            torch.randn(6, 5, generator=gen).to(dtype),
        )
        weight = torch.zeros(4, 5, dtype=acc) if with_weight else None
        bias = torch.zeros(4, dtype=acc) if with_bias else None
        for squared in (False, True):
            torch.library.opcheck(
                torch.ops.fisher_fast.linear_sq_sum_.default, (weight, bias, g, x, squared)
            )


def test_compile_sums_and_distances_fullgraph(gen: torch.Generator, device: str) -> None:
    def distances(ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return distances_from_sums(ops.frechet_sums([ref], [a, b]))

    torch._dynamo.reset()
    compiled = torch.compile(distances, fullgraph=True)
    ref, a, b = (random_fim(3000, gen, device=device) for _ in range(3))
    eager = distances(ref, a, b)
    torch.testing.assert_close(compiled(ref, a, b), eager, rtol=1e-14, atol=0)
    assert eager.shape == (2,)


def test_compile_frechet_distance(gen: torch.Generator, device: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(frechet_distance)
    a, b = random_fim(3000, gen, device=device), random_fim(3000, gen, device=device)
    torch.testing.assert_close(compiled(a, b), frechet_distance(a, b), rtol=1e-14, atol=0)
