"""Cells and the skeleton network: shapes, parameter counts, and the diagonal FIM."""

from __future__ import annotations

import pytest
import torch
from nas_helpers import EVERY_OP_4, IDENTITY_3

import fisher_fast
from fisher_fast.nas import Cell, Genotype, Network

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


@pytest.mark.parametrize("reduction", [False, True])
def test_cell_shapes(reduction: bool) -> None:
    cell = Cell(EVERY_OP_4, 4, 8 if reduction else 4, reduction)
    out = cell(torch.randn(2, 4, 7, 7))
    assert out.shape == ((2, 8, 4, 4) if reduction else (2, 4, 7, 7))


def test_cell_builds_only_live_edges() -> None:
    cell = Cell(Genotype(3, ("conv_3x3", "identity", "zero")), 4, 4, reduction=False)
    assert list(cell.ops) == ["0_2"]
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(cell(x), x)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["digits8", "cifar32"])
def test_network_runs_on_digits_and_cifar_sizes(shape: tuple[int, int, int]) -> None:
    net = Network(EVERY_OP_4, shape, 10, channels=4, cells_per_stage=2).eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert len(net.cells) == 3 * 2 + 2
    assert net.num_parameters == sum(p.numel() for p in net.parameters()) > 0


def test_parameter_count_by_hand() -> None:
    # stem 1*16*9 + BN 2*16; reduction 16->32: two 1x1 ReLU-conv-BN edges out of node 0
    # (16*32 + 2*32 each, the 1->2 identity has none); reduction 32->64: 2 * (32*64 + 2*64);
    # normal identity cells have none; head 64*10 + 10
    net = Network(IDENTITY_3, (1, 8, 8), 10)
    assert net.num_parameters == 176 + 2 * 576 + 2 * 2176 + 650 == 6330
    wider = Network(IDENTITY_3, (1, 8, 8), 10, channels=8, stages=2)
    assert wider.num_parameters == (72 + 16) + 2 * (8 * 16 + 32) + 16 * 10 + 10


def test_diag_fim_covers_every_network_parameter() -> None:
    net = Network(EVERY_OP_4, (1, 8, 8), 3, channels=2, stages=2)
    fim = fisher_fast.diag_fim(
        net,
        (torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])),
        on_unsupported="error",
        progress=False,
    )
    assert fim.flat.numel() == net.num_parameters
    assert torch.isfinite(fim.flat).all() and (fim.flat >= 0).all() and fim.flat.sum() > 0


def test_network_errors() -> None:
    with pytest.raises(ValueError, match="channels must be at least 1, got 0"):
        Network(IDENTITY_3, (1, 8, 8), 10, channels=0)
    with pytest.raises(ValueError, match=r"takes images \(C, H, W\)"):
        Network(IDENTITY_3, (64,), 10)
