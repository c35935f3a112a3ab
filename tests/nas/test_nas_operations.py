"""Every appendix-A operation keeps the shape (normal) or halves it (reduction)."""

from __future__ import annotations

import pytest
import torch

from fisher_fast.nas import OPERATIONS, make_operation

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def test_the_ten_operations_of_appendix_a() -> None:
    assert len(OPERATIONS) == 10 and OPERATIONS[:2] == ("zero", "identity")


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("op", OPERATIONS)
def test_operation_shapes(op: str, size: int) -> None:
    x = torch.randn(2, 4, size, size)
    assert make_operation(op, 4, 4)(x).shape == x.shape
    half = (size + 1) // 2
    assert make_operation(op, 4, 6, stride=2)(x).shape == (2, 6, half, half)


def test_zero_is_zero_and_identity_is_identity() -> None:
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(make_operation("zero", 3, 3)(x), torch.zeros_like(x))
    assert torch.equal(make_operation("identity", 3, 3)(x), x)


def test_operation_errors() -> None:
    with pytest.raises(ValueError, match="unknown operation 'conv_9x9'; choose one of zero"):
        make_operation("conv_9x9", 4, 4)
    with pytest.raises(ValueError, match=r"stride must be 1 .* or 2"):
        make_operation("conv_3x3", 4, 4, stride=3)
    with pytest.raises(ValueError, match="channel counts must be positive"):
        make_operation("conv_3x3", 0, 4)
