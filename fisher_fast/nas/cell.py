"""A cell module built from a :class:`~fisher_fast.nas.genotype.Genotype`."""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.nas.genotype import Genotype, edge_list
from fisher_fast.nas.operations import make_operation


class Cell(nn.Module):
    """Node 0 is the input ``(N, c_in, H, W)``; node ``j`` is the sum of ``op(node i)`` over its
    incoming edges; the output is the last node, ``(N, c_out, H', W')``.

    A normal cell (``reduction=False``, ``c_in == c_out`` usually) keeps ``H' = H``. A reduction
    cell uses the stride-2 variant on the edges leaving node 0 and sets ``H' = ceil(H / 2)``;
    every input-to-output path starts with exactly one such edge, so the sums agree in shape.
    Edges change ``c_in`` to ``c_out`` when they leave node 0. Only the genotype's live edges
    (:meth:`Genotype.live`) are built: dead edges cannot reach the output and would only add
    unused parameters, and leaving them out makes genotypes that differ only in
    dead edges build the same network.
    """

    def __init__(self, genotype: Genotype, c_in: int, c_out: int, reduction: bool) -> None:
        super().__init__()
        self.genotype = genotype
        self.reduction = reduction
        stride = 2 if reduction else 1
        edges = edge_list(genotype.nodes)
        # (source, target) of the live edges, ordered by target so sources are complete first
        self._wiring: list[tuple[int, int]] = []
        self.ops = nn.ModuleDict()
        for e in sorted(genotype.live()):
            i, j = edges[e]
            self._wiring.append((i, j))
            self.ops[f"{i}_{j}"] = make_operation(
                genotype.ops[e], c_in if i == 0 else c_out, c_out, stride if i == 0 else 1
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes: dict[int, torch.Tensor] = {0: x}
        for i, j in self._wiring:
            out = self.ops[f"{i}_{j}"](nodes[i])
            nodes[j] = nodes[j] + out if j in nodes else out
        return nodes[self.genotype.nodes - 1]

    def extra_repr(self) -> str:
        return f"{self.genotype}, reduction={self.reduction}"
