"""Cell genotypes: which operation sits on each edge of a densely connected cell DAG.

A cell with ``n`` nodes (3 or 4, the paper's appendix A) has node 0 as its input, node ``n - 1``
as its output, and one edge ``i -> j`` for every ``i < j``: ``n (n - 1) / 2`` edges, listed by
target node and then by source, ``(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)``. Each
intermediate and output node is the sum of its incoming edges (Figure 1a; the NAS-Bench-201
convention). The canonical string writes the edges into each node in that order, NAS-Bench-201
style: ``|conv_3x3~0|+|identity~0|zero~1|`` is node 1 = conv_3x3(node 0), node 2 =
identity(node 0) + zero(node 1).

Equivalence: an edge that lies on no input-to-output path of non-zero edges cannot change the
output (a cell builds only the edges on such paths, see :mod:`fisher_fast.nas.cell`), and
intermediate nodes that do not feed one another can be relabelled. :meth:`Genotype.canonical`
zeroes dead edges and picks the smallest relabelling, so equivalent cells share a
:meth:`Genotype.stable_hash`. Both checks cost at most ``(n - 2)!`` relabellings.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from fisher_fast.nas.operations import ZERO, check_operation

NODE_COUNTS: tuple[int, ...] = (3, 4)
"""Cell sizes of the paper's search space."""


@cache
def edge_list(nodes: int) -> tuple[tuple[int, int], ...]:
    """The edges ``(source, target)`` of a cell with ``nodes`` nodes, in genotype order."""
    if nodes not in NODE_COUNTS:
        raise ValueError(
            f"a cell has {' or '.join(map(str, NODE_COUNTS))} nodes (paper appendix A), got {nodes}"
        )
    return tuple((i, j) for j in range(1, nodes) for i in range(j))


def live_edges(nodes: int, nonzero: Sequence[bool]) -> frozenset[int]:
    """Indices of the edges on some input-to-output path of non-zero edges (``nonzero[e]`` says
    edge ``e`` is not ``zero``). Empty exactly when the output is unreachable."""
    edges = edge_list(nodes)
    reach_in = {0}
    for e, (i, j) in enumerate(edges):  # sorted by target: sources are final when visited
        if nonzero[e] and i in reach_in:
            reach_in.add(j)
    reach_out = {nodes - 1}
    for e in reversed(range(len(edges))):  # sorted by target, reversed: targets final first
        i, j = edges[e]
        if nonzero[e] and j in reach_out:
            reach_out.add(i)
    return frozenset(
        e for e, (i, j) in enumerate(edges) if nonzero[e] and i in reach_in and j in reach_out
    )


@dataclass(frozen=True)
class Genotype:
    """One cell: ``ops[e]`` is the operation on edge ``edge_list(nodes)[e]``.

    Construction checks the node count, the number of operations, their names, and that the
    output is reachable from the input through non-zero edges; every ``Genotype`` is valid.
    ``==`` compares the exact edges; :meth:`is_equivalent` compares the computed functions.
    """

    nodes: int
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        edges = edge_list(self.nodes)
        object.__setattr__(self, "ops", tuple(self.ops))
        if len(self.ops) != len(edges):
            raise ValueError(
                f"a {self.nodes}-node cell has {len(edges)} edges {list(edges)}, "
                f"got {len(self.ops)} operations"
            )
        for op in self.ops:
            check_operation(op)
        if not live_edges(self.nodes, [op != ZERO for op in self.ops]):
            raise ValueError(
                f"invalid cell {self.to_string()}: the output node {self.nodes - 1} is not "
                "reachable from the input through non-zero edges; put a non-zero operation on "
                "a path from node 0"
            )

    @property
    def edges(self) -> tuple[tuple[int, int, str], ...]:
        """``(source, target, operation)`` for every edge, in genotype order."""
        return tuple((i, j, op) for (i, j), op in zip(edge_list(self.nodes), self.ops, strict=True))

    def live(self) -> frozenset[int]:
        """Indices of the edges that can affect the output (the ones a cell builds)."""
        return live_edges(self.nodes, [op != ZERO for op in self.ops])

    def to_string(self) -> str:
        """The canonical string of exactly these edges, e.g. ``|conv_3x3~0|+|identity~0|zero~1|``."""
        groups = [
            "|" + "|".join(f"{op}~{i}" for i, j, op in self.edges if j == target) + "|"
            for target in range(1, self.nodes)
        ]
        return "+".join(groups)

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> Genotype:
        """Parse :meth:`to_string`'s format; the edges into each node must be listed in order."""
        groups = text.strip().split("+")
        ops: list[str] = []
        for target, group in enumerate(groups, start=1):
            if not (group.startswith("|") and group.endswith("|")) or len(group) < 2:
                raise ValueError(
                    f"cannot parse genotype {text!r}: node {target}'s group {group!r} must look "
                    "like |op~0|op~1|"
                )
            entries = group[1:-1].split("|")
            sources = [entry.rpartition("~")[2] for entry in entries]
            if sources != [str(i) for i in range(target)]:
                raise ValueError(
                    f"cannot parse genotype {text!r}: node {target} must list one edge from each "
                    f"of nodes 0..{target - 1} in order, as op~source, got {group!r}"
                )
            ops.extend(entry.rpartition("~")[0] for entry in entries)
        return cls(len(groups) + 1, tuple(ops))

    def canonical(self) -> Genotype:
        """The representative of this cell's equivalence class: dead edges set to ``zero``, then
        the smallest string over the relabellings of intermediate nodes that keep every
        non-zero edge pointing from a lower to a higher node."""
        edges = edge_list(self.nodes)
        live = self.live()
        kept = {edges[e]: self.ops[e] for e in live}
        inner = range(1, self.nodes - 1)
        best: Genotype | None = None
        for perm in itertools.permutations(inner):
            relabel = {0: 0, self.nodes - 1: self.nodes - 1, **dict(zip(inner, perm, strict=True))}
            moved = {(relabel[i], relabel[j]): op for (i, j), op in kept.items()}
            if any(i >= j for i, j in moved):
                continue
            candidate = Genotype(self.nodes, tuple(moved.get(e, ZERO) for e in edges))
            if best is None or candidate.to_string() < best.to_string():
                best = candidate
        assert best is not None  # the identity relabelling always qualifies
        return best

    def stable_hash(self) -> str:
        """SHA-256 (hex) of the canonical string: the same across runs, processes and machines,
        and the same for equivalent cells."""
        return hashlib.sha256(self.canonical().to_string().encode()).hexdigest()

    def is_equivalent(self, other: Genotype) -> bool:
        """True when both cells compute the same function family (same canonical form)."""
        return self.canonical() == other.canonical()
