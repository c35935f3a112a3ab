"""Search spaces of cells: the full space of appendix A and the space restricted to a baseline
task's best cell (the paper's ``S = S_{a*}``, Algorithm 1)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

import torch

from fisher_fast.nas.genotype import Genotype, edge_list, live_edges
from fisher_fast.nas.operations import OPERATIONS, ZERO, check_operation

LIST_LIMIT = 4096
"""Spaces up to this many genotypes are listed (milliseconds) when their classes must be counted."""


class SearchSpace:
    """Cells with ``nodes`` nodes whose ``structure`` edges each carry one of ``operations``;
    the other edges are ``zero``. Only valid genotypes (output reachable) belong to the space.

    The full space (:meth:`full`) has every edge in the structure and all ten operations, so
    ``10 ** (n (n - 1) / 2)`` genotypes before the validity check. (The paper's §3.2 prints the
    count as ``m exp(n! / (2 (n - 2)!))``; the densely connected DAG has ``n (n - 1) / 2`` edges
    with ``m`` choices each, which is the count used here.)
    """

    def __init__(
        self,
        nodes: int,
        operations: Sequence[str] = OPERATIONS,
        structure: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        edges = edge_list(nodes)
        structure = set(edges if structure is None else structure)
        if not structure <= set(edges):
            raise ValueError(
                f"structure edges {sorted(structure - set(edges))} are not edges of a "
                f"{nodes}-node cell; its edges are {list(edges)}"
            )
        if not operations:
            raise ValueError("a search space needs at least one operation")
        for op in operations:
            check_operation(op)
        if len(set(operations)) != len(operations):
            raise ValueError(f"operations must be distinct, got {list(operations)}")
        self.nodes = nodes
        self.operations = tuple(sorted(operations, key=OPERATIONS.index))
        self.structure = tuple(e for e in edges if e in structure)
        self._choices = tuple(self.operations if e in structure else (ZERO,) for e in edges)
        if self.size == 0:
            raise ValueError(
                f"the space of {nodes}-node cells with operations {list(self.operations)} on "
                f"edges {list(self.structure)} has no valid cell: no choice connects the input "
                "to the output; add a non-zero operation or an input-to-output path of edges"
            )

    @classmethod
    def full(cls, nodes: int) -> SearchSpace:
        """Every ``nodes``-node cell over the ten operations (the baselines' general space)."""
        return cls(nodes)

    @classmethod
    def restricted_to(cls, best: Genotype) -> SearchSpace:
        """The space of a baseline's best cell: its node count, its structure (the edges that
        reach the output, :meth:`Genotype.live`) and its operation set (the operations on those
        edges). ``zero`` is not among them, so every cell of this space keeps the structure."""
        edges = edge_list(best.nodes)
        live = sorted(best.live())
        return cls(best.nodes, sorted({best.ops[e] for e in live}), [edges[e] for e in live])

    @property
    def size(self) -> int:
        """Number of valid genotypes. Validity depends only on which edges are non-zero, so
        this sums over the ``2 ** edges`` zero/non-zero patterns instead of listing cells."""
        total = 0
        for nonzero in itertools.product((False, True), repeat=len(self._choices)):
            if live_edges(self.nodes, nonzero):
                total += math.prod(
                    len(c) - (ZERO in c) if nz else int(ZERO in c)
                    for nz, c in zip(nonzero, self._choices, strict=True)
                )
        return total

    def __len__(self) -> int:
        return self.size

    def __contains__(self, genotype: object) -> bool:
        return (
            isinstance(genotype, Genotype)
            and genotype.nodes == self.nodes
            and all(op in c for op, c in zip(genotype.ops, self._choices, strict=True))
        )

    def __iter__(self) -> Iterator[Genotype]:
        """Every valid genotype, in a fixed order (``size`` of them; 10**6 for the full 4-node
        space, so meant for small spaces)."""
        for ops in itertools.product(*self._choices):
            if live_edges(self.nodes, [op != ZERO for op in ops]):
                yield Genotype(self.nodes, ops)

    def count_distinct(self) -> int:
        """Number of equivalence classes (distinct :meth:`Genotype.stable_hash`), by listing
        the space: exact, but costs a canonical form per genotype."""
        return len({g.canonical() for g in self})

    def sample(
        self,
        k: int,
        generator: torch.Generator,
        *,
        exclude: Iterable[Genotype] = (),
        max_draws: int = 100_000,
    ) -> list[Genotype]:
        """``k`` pairwise non-equivalent genotypes, none equivalent to one in ``exclude``.

        Each draw picks one assignment of operations uniformly (one ``torch.randint`` from
        ``generator``), so every valid genotype is equally likely; invalid ones and ones
        equivalent to an earlier pick (same :meth:`Genotype.stable_hash`) are drawn again.
        The same generator state gives the same list. Raises a RuntimeError after
        ``max_draws`` draws, which happens when the space has fewer than ``k`` cells left
        that are not equivalent to one already chosen or excluded.
        """
        if k < 0:
            raise ValueError(f"k must be non-negative, got {k}")
        if k > self.size:
            raise ValueError(f"cannot sample {k} distinct cells from a space of {self.size}")
        seen = {g.canonical() for g in exclude}
        radices = [len(c) for c in self._choices]
        picked: list[Genotype] = []
        for _ in range(max_draws):
            if len(picked) == k:
                return picked
            index = int(torch.randint(math.prod(radices), (1,), generator=generator).item())
            ops = []
            for choices, radix in zip(self._choices, radices, strict=True):
                index, digit = divmod(index, radix)
                ops.append(choices[digit])
            if not live_edges(self.nodes, [op != ZERO for op in ops]):
                continue
            genotype = Genotype(self.nodes, tuple(ops))
            if genotype.canonical() not in seen:
                seen.add(genotype.canonical())
                picked.append(genotype)
        if len(picked) == k:
            return picked
        raise RuntimeError(
            f"found only {len(picked)} of {k} distinct cells in {max_draws} draws: the space has "
            f"fewer non-equivalent cells than requested (count_distinct() gives the number); "
            "ask for fewer or raise max_draws"
        )

    def sample_up_to(self, k: int, generator: torch.Generator) -> list[Genotype]:
        """``min(k, count_distinct())`` pairwise non-equivalent genotypes: :meth:`sample` when
        the space holds ``k`` of them, else one genotype of every equivalence class, in a
        random order drawn from ``generator``. A small space (at most ``max(k, LIST_LIMIT)``
        genotypes) is listed to count its classes; a larger one is sampled directly."""
        if k < 0:
            raise ValueError(f"k must be non-negative, got {k}")
        if self.size > max(k, LIST_LIMIT):
            return self.sample(k, generator)
        classes: dict[Genotype, Genotype] = {}
        for genotype in self:
            classes.setdefault(genotype.canonical(), genotype)
        if k < len(classes):
            return self.sample(k, generator)
        every = list(classes.values())
        return [every[i] for i in torch.randperm(len(every), generator=generator).tolist()]

    def __repr__(self) -> str:
        return (
            f"SearchSpace(nodes={self.nodes}, operations={list(self.operations)}, "
            f"structure={list(self.structure)}, size={self.size})"
        )
