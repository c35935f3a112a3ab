"""Tests of fisher_fast.distance: the Fréchet distance of diagonal FIMs (paper eq. 3 and 4).

Every value is checked against ``reference_frechet`` (conftest), a plain float64 evaluation of
eq. 4 that does not use the three-sum form, on fresh random data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
import torch
from fim_values import random_fim, reference_frechet

from fisher_fast import frechet_distance, frechet_distance_full, frechet_distances

# The three-sum form d^2 = 1 - C / sqrt(SA SB) carries an absolute error on d^2 of a few units of
# 1e-16 whatever d is: the final division and square root alone round at 1.1e-16 each, and the
# kernel keeps the sums' own rounding at that level (short chains, compensated between blocks).
# So d is checked through d^2: near d = 1e-6 (d^2 = 1e-12) the bound is a relative error of ~1e-3,
# near d = 0 an absolute error of ~4e-8 on d. Measured over ~3000 random draws of each case of
# test_near_identical_inputs, on the AVX-512 and the portable CPU kernels (the latter also with
# the longer chains of AVX2), the largest error was 5.6e-16; D2_ATOL leaves a factor ~3.
D2_ATOL = 1.5e-15


def assert_distance(got: torch.Tensor | float, expected: float) -> None:
    """``got`` is the distance ``expected`` to the accuracy of the three-sum form (D2_ATOL)."""
    got = float(got)
    assert 0.0 <= got <= 1.0
    assert got * got == pytest.approx(expected * expected, abs=D2_ATOL), (got, expected)


# Sizes around every boundary of the CPU kernels: vector width (8), unrolled group (24), run (256),
# block (1024), the least work for a second thread (32 blocks), odd lengths; 10^7 once below.
SIZES = [1, 2, 3, 7, 8, 9, 23, 24, 25, 47, 255, 257, 1023, 1024, 1025, 32773, 65539, 10**6 + 1]


@pytest.mark.parametrize("n", SIZES)
def test_random_inputs_match_reference(n: int, gen: torch.Generator, device: str) -> None:
    a = random_fim(n, gen, device=device)
    b = random_fim(n, gen, device=device)
    assert_distance(frechet_distance(a, b), reference_frechet(a, b))


def test_result_is_float64_on_the_inputs_device(gen: torch.Generator, device: str) -> None:
    a, b = random_fim(1000, gen, device=device), random_fim(1000, gen, device=device)
    for d in (frechet_distance(a, b), frechet_distances(a, [b, a])):
        assert d.dtype == torch.float64 and d.device == a.device


def test_ten_million_elements(gen: torch.Generator) -> None:
    a = random_fim(10**7, gen)
    b = random_fim(10**7, gen, zeros=0.1)
    assert_distance(frechet_distance(a, b), reference_frechet(a, b))


@pytest.mark.parametrize("target", [1e-4, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 17, 4097, 100_003])
def test_near_identical_inputs(
    target: float, dtype: torch.dtype, n: int, gen: torch.Generator, device: str
) -> None:
    # With random signs s, b = a (1 + delta s) has d = delta / (2 sqrt 2) * sqrt(1 - w^2) to first
    # order, w = sum(a s) / sum(a) (the part that normalisation takes out, small for large n).
    a = random_fim(n, gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    b = (a * (1 + 2 * math.sqrt(2) * target * signs)).to(dtype=dtype, device=device)
    a = a.to(dtype=dtype, device=device)
    ref = reference_frechet(a, b)
    assert frechet_distance(a, b, squared=True).item() == pytest.approx(ref**2, abs=D2_ATOL)
    assert_distance(frechet_distance(a, b), ref)
    if n > 1000:  # enough terms for d to be near `target`, where first order is accurate
        w = (a.double() * signs.to(device)).sum().item() / a.double().sum().item()
        assert ref == pytest.approx(target * math.sqrt(1 - w * w), rel=0.01)


@pytest.mark.parametrize("n", [5, 4097, 50_000])
def test_exact_zeros(n: int, gen: torch.Generator, device: str) -> None:
    a = random_fim(n, gen, device=device, zeros=0.5)
    b = random_fim(n, gen, device=device, zeros=0.5)
    a[0] = 1.0  # neither may be all zeros
    b[-1] = 1.0
    assert_distance(frechet_distance(a, b), reference_frechet(a, b))


def test_zeros_in_one_only(gen: torch.Generator, device: str) -> None:
    a = random_fim(1000, gen, device=device)
    b = a.clone()
    b[::3] = 0.0
    assert_distance(frechet_distance(a, b), reference_frechet(a, b))


def test_disjoint_supports_are_at_distance_one(device: str) -> None:
    a = torch.tensor([1.0, 2.0, 0.0, 0.0], device=device)
    b = torch.tensor([0.0, 0.0, 3.0, 4.0], device=device)
    assert frechet_distance(a, b).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 31, 5000])
def test_dtypes(dtype: torch.dtype, n: int, gen: torch.Generator, device: str) -> None:
    # random_fim stays inside the float16 range; the reference sees the same rounded values.
    a = random_fim(n, gen, dtype=dtype, device=device)
    b = random_fim(n, gen, dtype=dtype, device=device)
    d = frechet_distance(a, b)
    assert d.dtype == torch.float64
    assert_distance(d, reference_frechet(a, b))


def test_mixed_dtypes_are_promoted(gen: torch.Generator) -> None:
    a = random_fim(100, gen, dtype=torch.float16)
    b = random_fim(100, gen, dtype=torch.float64)
    assert_distance(frechet_distance(a, b), reference_frechet(a, b))


def test_non_contiguous_inputs(gen: torch.Generator) -> None:
    a = random_fim(600, gen).reshape(20, 30).t()
    b = random_fim(600, gen).reshape(20, 30).t()
    assert not a.is_contiguous()
    assert_distance(frechet_distance(a, b), reference_frechet(a, b))


def named_fim(gen: torch.Generator, names: list[str]) -> dict[str, torch.Tensor]:
    shapes = {
        "conv.weight": (4, 3, 3, 3),
        "conv.bias": (4,),
        "fc.weight": (10, 36),
        "fc.bias": (10,),
    }
    return {name: random_fim(math.prod(shapes[name]), gen).reshape(shapes[name]) for name in names}


def flat(fim: dict[str, torch.Tensor], order: list[str]) -> torch.Tensor:
    return torch.cat([fim[name].reshape(-1) for name in order])


NAMES = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]


def test_dicts_are_matched_by_name(gen: torch.Generator) -> None:
    a = named_fim(gen, NAMES)
    b = named_fim(gen, NAMES[::-1])  # same names, another order
    expected = reference_frechet(flat(a, NAMES), flat(b, NAMES))
    assert_distance(frechet_distance(a, b), expected)


def test_lists_are_matched_by_position(gen: torch.Generator) -> None:
    a = named_fim(gen, NAMES)
    b = named_fim(gen, NAMES)
    expected = reference_frechet(flat(a, NAMES), flat(b, NAMES))
    got = frechet_distance(list(a.values()), list(b.values()))
    assert_distance(got, expected)


def test_dict_against_flat_tensor(gen: torch.Generator) -> None:
    a = named_fim(gen, NAMES)
    b = random_fim(sum(t.numel() for t in a.values()), gen)
    expected = reference_frechet(flat(a, NAMES), b)
    assert_distance(frechet_distance(a, b), expected)
    assert_distance(frechet_distance(b, a), expected)


def test_dict_against_list_is_refused(gen: torch.Generator) -> None:
    a = named_fim(gen, NAMES)
    with pytest.raises(TypeError, match="F_b is a list but the reference is not; pass both alike"):
        frechet_distance(a, list(a.values()))


@dataclass
class FlatFIM:
    """Stands in for fisher_fast.DiagFIM: anything with a flat tensor in ``.flat``."""

    flat: torch.Tensor


def test_objects_with_a_flat_tensor(gen: torch.Generator) -> None:
    a, b = random_fim(300, gen), random_fim(300, gen)
    expected = reference_frechet(a, b)
    assert_distance(frechet_distance(FlatFIM(a), FlatFIM(b)), expected)


def test_distance_to_itself_is_zero(gen: torch.Generator, device: str) -> None:
    a = random_fim(100_003, gen, device=device)
    assert 0.0 <= frechet_distance(a, a).item() <= 1e-7
    assert 0.0 <= frechet_distance(a, a.clone()).item() <= 1e-7


@pytest.mark.parametrize("n", [1, 2, 1000])
def test_range_and_symmetry(n: int, gen: torch.Generator) -> None:
    for _ in range(20):
        a = random_fim(n, gen, zeros=0.3)
        b = random_fim(n, gen, zeros=0.3)
        if a.sum() == 0 or b.sum() == 0:
            continue
        d = frechet_distance(a, b).item()
        assert 0.0 <= d <= 1.0
        assert_distance(frechet_distance(b, a), d)


def test_scaling_either_input_changes_nothing(gen: torch.Generator, device: str) -> None:
    a = random_fim(10_000, gen, dtype=torch.float64, device=device)
    b = random_fim(10_000, gen, dtype=torch.float64, device=device)
    d = frechet_distance(a, b).item()
    for scale in torch.logspace(-20, 20, 5, dtype=torch.float64).tolist():
        assert_distance(frechet_distance(a * scale, b), d)
        assert_distance(frechet_distance(a, b * scale), d)


def test_squared_form_is_the_square(gen: torch.Generator, device: str) -> None:
    a = random_fim(5000, gen, device=device)
    b = random_fim(5000, gen, device=device)
    d = frechet_distance(a, b).item()
    assert frechet_distance(a, b, squared=True).item() == pytest.approx(d * d, rel=1e-14)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_one_to_many_equals_single_calls(k: int, gen: torch.Generator, device: str) -> None:
    ref = named_fim(gen, NAMES)
    others = [named_fim(gen, NAMES) for _ in range(k)]
    ref = {n: t.to(device) for n, t in ref.items()}
    others = [{n: t.to(device) for n, t in o.items()} for o in others]
    many = frechet_distances(ref, others)
    assert many.shape == (k,)
    assert many.dtype == torch.float64
    singles = torch.stack([frechet_distance(ref, o) for o in others])
    torch.testing.assert_close(many, singles, rtol=0, atol=1e-15)
    squared = frechet_distances(ref, others, squared=True)
    torch.testing.assert_close(squared, many**2, rtol=1e-14, atol=0)


def random_psd(n: int, gen: torch.Generator, rank: int) -> torch.Tensor:
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return x @ x.T


def scipy_eq3(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 3 independently: unit trace, then sqrt(tr(A + B - 2 (A B)^1/2) / 2) with sqrtm."""
    a = a / np.trace(a)
    b = b / np.trace(b)
    cross = np.trace(scipy.linalg.sqrtm(a @ b)).real
    return math.sqrt(max(0.0, (np.trace(a) + np.trace(b) - 2 * cross) / 2))


def test_full_form_on_diagonal_matrices_is_the_diagonal_form(gen: torch.Generator) -> None:
    a = random_fim(40, gen, dtype=torch.float64, zeros=0.2)
    b = random_fim(40, gen, dtype=torch.float64, zeros=0.2)
    a[0] = b[1] = 1.0
    full = frechet_distance_full(torch.diag(a), torch.diag(b)).item()
    assert full == pytest.approx(reference_frechet(a, b), abs=1e-12)
    assert full == pytest.approx(frechet_distance(a, b).item(), abs=1e-12)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_full_form_matches_scipy(n: int, gen: torch.Generator) -> None:
    a = random_psd(n, gen, rank=2 * n)
    b = random_psd(n, gen, rank=2 * n)
    d = frechet_distance_full(a, b).item()
    assert d == pytest.approx(scipy_eq3(a.numpy(), b.numpy()), abs=1e-9)
    assert frechet_distance_full(b, a).item() == pytest.approx(d, abs=1e-9)
    assert frechet_distance_full(a * 7.5, b / 3).item() == pytest.approx(d, abs=1e-9)
    assert 0.0 <= d <= 1.0


def test_full_form_on_singular_matrices(gen: torch.Generator) -> None:
    a = random_psd(12, gen, rank=3)
    b = random_psd(12, gen, rank=5)
    d = frechet_distance_full(a, b).item()
    assert 0.0 < d <= 1.0
    # The null space's eigenvalues come out as +-1e-17, whose clamped roots (~1e-9) reach d^2.
    assert frechet_distance_full(b, a).item() == pytest.approx(d, abs=1e-6)
    assert frechet_distance_full(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_full_form_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square matrices of one size"):
        frechet_distance_full(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="square matrices of one size"):
        frechet_distance_full(torch.ones(3, 2), torch.ones(3, 2))


# Bad inputs: every error names the culprit and says what is wrong.

INVALID = [-1.0, float("nan"), float("inf"), -float("inf"), -1e-40]  # -1e-40: float32 subnormal


def test_different_numbers_of_elements() -> None:
    with pytest.raises(ValueError, match="F_b tensor 0 has 11 elements but the reference has 10"):
        frechet_distance(torch.ones(10), torch.ones(11))
    with pytest.raises(ValueError, match="F_b has 9 elements but F_a has 8"):
        frechet_distance({"w": torch.ones(6), "b": torch.ones(2)}, torch.ones(9))
    with pytest.raises(ValueError, match=r"F_b 'w' has 4 elements but the reference has 6"):
        frechet_distance(
            {"w": torch.ones(6), "b": torch.ones(2)}, {"w": torch.ones(4), "b": torch.ones(2)}
        )


def test_different_parameter_names() -> None:
    with pytest.raises(
        ValueError, match=r"name different parameters: missing \['b'\], unexpected \['c'\]"
    ):
        frechet_distance(
            {"w": torch.ones(3), "b": torch.ones(2)}, {"w": torch.ones(3), "c": torch.ones(2)}
        )


def test_different_numbers_of_tensors() -> None:
    with pytest.raises(ValueError, match="F_b holds 3 tensors but F_a holds 2"):
        frechet_distance(
            [torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(1), torch.ones(1)]
        )


@pytest.mark.parametrize("which", ["F_a", "F_b"])
def test_all_zero_fim(which: str) -> None:
    zero, one = torch.zeros(5), torch.ones(5)
    args = (zero, one) if which == "F_a" else (one, zero)
    with pytest.raises(ValueError, match=f"{which} is all zeros"):
        frechet_distance(*args)


@pytest.mark.parametrize("value", INVALID)
@pytest.mark.parametrize("which", ["F_a", "F_b"])
def test_invalid_entries(value: float, which: str, device: str) -> None:
    bad = torch.ones(33, device=device)
    bad[17] = value
    good = torch.ones(33, device=device)
    args = (bad, good) if which == "F_a" else (good, bad)
    with pytest.raises(ValueError, match=f"{which} has 1 negative, NaN or infinite entries"):
        frechet_distance(*args)


def test_invalid_entries_are_counted_and_named_in_one_to_many() -> None:
    bad = torch.ones(100)
    bad[[3, 50, 99]] = torch.tensor([-2.0, float("nan"), float("inf")])
    with pytest.raises(ValueError, match="FIM 1 has 3 negative, NaN or infinite entries"):
        frechet_distances(torch.ones(100), [torch.ones(100), bad])


def test_negative_zero_is_a_valid_entry() -> None:
    a = torch.tensor([-0.0, 1.0, 2.0])
    b = torch.tensor([0.0, 1.0, 2.0])
    assert frechet_distance(a, b).item() == pytest.approx(0.0, abs=1e-7)


def test_empty_inputs() -> None:
    with pytest.raises(ValueError, match=r"F_a is empty \(0 elements\)"):
        frechet_distance(torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="F_a is empty: it holds no tensors"):
        frechet_distance({}, {})
    with pytest.raises(ValueError, match="others is empty"):
        frechet_distances(torch.ones(3), [])


def test_tensors_on_different_devices() -> None:
    with pytest.raises(ValueError, match="F_b tensor 0 is on meta but the reference is on cpu"):
        frechet_distance(torch.ones(4), torch.ones(4, device="meta"))


def test_wrong_types() -> None:
    with pytest.raises(TypeError, match="F_a must be a tensor, a DiagFIM, or a dict or list"):
        frechet_distance("weights", torch.ones(3))
    with pytest.raises(TypeError, match="F_b must be a tensor, a DiagFIM, or a dict or list"):
        frechet_distance(torch.ones(3), 3.0)
    with pytest.raises(TypeError, match=r"F_b\['w'\] is a list, not a tensor"):
        frechet_distance({"w": torch.ones(3)}, {"w": [1.0, 2.0, 3.0]})
    with pytest.raises(TypeError, match=r"must be floating point, got torch\.int64"):
        frechet_distance(torch.ones(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="others must be a list of FIMs"):
        frechet_distances(torch.ones(3), torch.ones(3))
