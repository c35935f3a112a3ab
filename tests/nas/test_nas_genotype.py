"""Genotype strings, JSON, stable hashes, equivalence and validity errors."""

from __future__ import annotations

import pytest
import torch
from nas_helpers import EVERY_OP_4

from fisher_fast.nas import Genotype, SearchSpace, edge_list

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def test_edges_are_ordered_by_target_then_source() -> None:
    assert edge_list(3) == ((0, 1), (0, 2), (1, 2))
    assert edge_list(4) == ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


@pytest.mark.parametrize("nodes", [3, 4])
def test_string_round_trips(nodes: int) -> None:
    for g in SearchSpace.full(nodes).sample(20, torch.Generator().manual_seed(nodes)):
        assert Genotype.from_string(g.to_string()) == g
        assert str(g) == g.to_string()


def test_canonical_string_and_stable_hash_are_fixed() -> None:
    g = Genotype(3, ("conv_3x3", "identity", "zero"))
    assert g.to_string() == "|conv_3x3~0|+|identity~0|zero~1|"
    # sha256 of "|zero~0|+|identity~0|zero~1|": conv_3x3 on 0->1 is dead (1 feeds nothing)
    assert g.stable_hash() == "4e97b3e9c556ecb6a9a6383bec305bb173a30a5a9eb144b341a9edc096ba1d3a"


def test_dead_edges_do_not_change_the_hash() -> None:
    # node 1 feeds nothing alive, so whatever enters it is dead
    a = Genotype(3, ("conv_3x3", "identity", "zero"))
    b = Genotype(3, ("max_pool_3x3", "identity", "zero"))
    # node 1 receives nothing, so its outgoing edge is dead
    c = Genotype(3, ("zero", "identity", "conv_5x5"))
    assert a != b and a.is_equivalent(b) and a.stable_hash() == b.stable_hash() == c.stable_hash()
    assert a.canonical() == Genotype(3, ("zero", "identity", "zero"))
    assert a.live() == frozenset({1})


def test_swapping_unlinked_intermediate_nodes_does_not_change_the_hash() -> None:
    a = Genotype(4, ("conv_3x3", "identity", "zero", "conv_5x5", "max_pool_3x3", "avg_pool_3x3"))
    swapped = Genotype(
        4, ("identity", "conv_3x3", "zero", "conv_5x5", "avg_pool_3x3", "max_pool_3x3")
    )
    assert a.stable_hash() == swapped.stable_hash()
    # a different pairing of the same operations is a different cell
    other = Genotype(
        4, ("conv_3x3", "identity", "zero", "conv_5x5", "avg_pool_3x3", "max_pool_3x3")
    )
    assert a.stable_hash() != other.stable_hash()
    # once node 1 feeds node 2 the nodes are ordered and cannot be swapped
    linked = Genotype(4, ("conv_3x3", "identity", "conv_7x7", *a.ops[3:]))
    assert linked.canonical() == linked
    assert EVERY_OP_4.canonical() == EVERY_OP_4


def test_invalid_genotypes_are_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"a cell has 3 or 4 nodes .* got 5"):
        Genotype(5, ("identity",) * 10)
    with pytest.raises(ValueError, match=r"a 3-node cell has 3 edges .* got 2 operations"):
        Genotype(3, ("identity", "identity"))
    with pytest.raises(ValueError, match="unknown operation 'sep_conv_3x3'"):
        Genotype(3, ("identity", "sep_conv_3x3", "identity"))
    with pytest.raises(ValueError, match=r"output node 2 is not reachable .* put a non-zero"):
        Genotype(3, ("identity", "zero", "zero"))
    with pytest.raises(ValueError, match="output node 3 is not reachable"):
        Genotype(4, ("zero", "zero", "identity", "zero", "identity", "identity"))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("conv_3x3~0+|identity~0|zero~1|", "node 1's group 'conv_3x3~0' must look like"),
        ("|conv_3x3~0|+|zero~1|identity~0|", "node 2 must list one edge from each of nodes 0..1"),
        ("|conv_3x3~0|+|identity~0|", "node 2 must list one edge"),
        ("|conv_3x3~0|", "a cell has 3 or 4 nodes"),
    ],
)
def test_malformed_strings_are_rejected(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Genotype.from_string(text)
