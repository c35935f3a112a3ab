"""How well two (K, K) matrices order the sources of each target alike: Spearman's rank
correlation over all pairs a != b with a permutation p-value, per target column, and the
closest source by each. The §4.4 study uses it to compare the Fréchet task distance with the
transfer gain (a close task should transfer well: a negative correlation)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

PERMUTATIONS = 10_000
"""Random permutations behind the p-value of the overall rank correlation."""


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (ties get their average rank); NaN when
    either is constant."""
    return _pearson(_ranks(x), _ranks(y)[None, :])[0]


def _pearson(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson correlation of the 1-D ``x`` with each row of ``ys`` (NaN for a constant one)."""
    x = x - x.mean()
    ys = ys - ys.mean(axis=1, keepdims=True)
    norm = np.sqrt((x * x).sum() * (ys * ys).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, ys @ x / norm, np.nan)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_agreement(distance: torch.Tensor, gain: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """How well the (K, K) distance means order sources as the (K, K) transfer gains do.

    Returns plain JSON: ``spearman`` over the K (K - 1) pairs a ≠ b, ``p_value`` (two-sided,
    the share of :data:`PERMUTATIONS` seeded random pairings of the same values whose |ρ| is at
    least as large), ``per_target`` (ρ over the K - 1 sources of each target column),
    ``closest_by_distance`` / ``closest_by_transfer`` (each target's source of smallest distance
    / largest gain) and ``same_closest`` (how many targets the two agree on)."""
    k = distance.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    d, g = distance[off].numpy(), gain[off].numpy()
    rho = spearman(d, g)
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(_ranks(g), (PERMUTATIONS, 1)), axis=1)
    permuted = _pearson(_ranks(d), shuffled)
    p_value = (1 + int((np.abs(permuted) >= abs(rho) - 1e-12).sum())) / (1 + PERMUTATIONS)
    per_target = [
        spearman(distance[off[:, b], b].numpy(), gain[off[:, b], b].numpy()) for b in range(k)
    ]
    masked_d = distance.clone().fill_diagonal_(math.inf)
    masked_g = gain.clone().fill_diagonal_(-math.inf)
    by_distance = [int(a) for a in masked_d.argmin(0)]
    by_transfer = [int(a) for a in masked_g.argmax(0)]
    return {
        "spearman": rho,
        "p_value": p_value,
        "pairs": int(off.sum()),
        "per_target": per_target,
        "closest_by_distance": by_distance,
        "closest_by_transfer": by_transfer,
        "same_closest": sum(a == b for a, b in zip(by_distance, by_transfer, strict=True)),
    }
