"""Fréchet distance between diagonal Fisher information matrices (paper eq. 3 and 4).

With unit-trace diagonals a and b, eq. 4 is d = ||sqrt(a) - sqrt(b)||_2 / sqrt(2). Because both
sum to one, d^2 = 1 - sum_i sqrt(a_i b_i), so for raw diagonals A and B

    d^2 = max(0, 1 - sum_i sqrt(A_i B_i) / sqrt(sum A * sum B)),

three float64 sums from one pass over the data (the frechet_sums kernel). The normalisation to
unit trace therefore happens inside, and the result does not change when either input is scaled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from fisher_fast import ops


class HasFlatFIM(Protocol):
    """Anything holding a diagonal FIM as one flat tensor (e.g. :class:`fisher_fast.DiagFIM`)."""

    @property
    def flat(self) -> torch.Tensor: ...


FIMLike = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | HasFlatFIM


def _as_tensor_list(fim: Any, what: str) -> tuple[list[str] | None, list[torch.Tensor]]:
    """Split a FIM given in any accepted form into (names or None, list of contiguous tensors)."""
    if isinstance(fim, torch.Tensor):
        return None, [fim.contiguous()]
    if hasattr(fim, "flat") and isinstance(fim.flat, torch.Tensor):
        return None, [fim.flat.contiguous()]
    if isinstance(fim, Mapping):
        names = list(fim.keys())
        tensors = list(fim.values())
    elif isinstance(fim, Sequence) and not isinstance(fim, (str, bytes)):
        names, tensors = None, list(fim)
    else:
        raise TypeError(
            f"{what} must be a tensor, a DiagFIM, or a dict or list of tensors; got {type(fim).__name__}"
        )
    if not tensors:
        raise ValueError(f"{what} is empty: it holds no tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            label = names[i] if names else f"item {i}"
            raise TypeError(f"{what}[{label!r}] is a {type(t).__name__}, not a tensor")
    return names, [t.contiguous() for t in tensors]


def _align(
    ref_names: list[str] | None,
    ref: list[torch.Tensor],
    names: list[str] | None,
    tensors: list[torch.Tensor],
    what: str,
) -> list[torch.Tensor]:
    """Order ``tensors`` like the reference and check that both describe the same parameters."""
    if (ref_names is None) != (names is None):
        # One side is a flat tensor or list, the other a dict: compare flattened contents.
        if len(ref) == 1 or len(tensors) == 1:
            ref_total = sum(t.numel() for t in ref)
            total = sum(t.numel() for t in tensors)
            if ref_total != total:
                raise ValueError(
                    f"{what} has {total} elements but the reference FIM has {ref_total}; "
                    "both must describe the same parameters"
                )
            return (
                [torch.cat([t.reshape(-1) for t in tensors])]
                if len(ref) == 1
                else list(
                    torch.cat([t.reshape(-1) for t in tensors]).split([t.numel() for t in ref])
                )
            )
        raise TypeError(
            f"{what} is a {'dict' if names else 'list'} but the reference is not; pass both alike"
        )
    if ref_names is not None and names is not None:
        missing = [n for n in ref_names if n not in names]
        extra = [n for n in names if n not in ref_names]
        if missing or extra:
            raise ValueError(
                f"{what} and the reference FIM name different parameters: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        by_name = dict(zip(names, tensors, strict=True))
        tensors = [by_name[n] for n in ref_names]
    if len(tensors) != len(ref):
        raise ValueError(
            f"{what} holds {len(tensors)} tensors but the reference FIM holds {len(ref)}"
        )
    for i, (r, t) in enumerate(zip(ref, tensors, strict=True)):
        label = repr(ref_names[i]) if ref_names else f"tensor {i}"
        if r.numel() != t.numel():
            raise ValueError(
                f"{what} {label} has {t.numel()} elements but the reference has {r.numel()}"
            )
        if r.device != t.device:
            raise ValueError(
                f"{what} {label} is on {t.device} but the reference is on {r.device}; "
                "move both FIMs to one device"
            )
    return tensors


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    dtype = tensors[0].dtype
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"FIM tensors must be floating point, got {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def distances_from_sums(sums: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Distances (K,) from the (K, 5) result of :func:`fisher_fast.ops.frechet_sums`."""
    sum_ref, sum_other, cross = sums[:, 0], sums[:, 1], sums[:, 2]
    d2 = (1.0 - cross / torch.sqrt(sum_ref * sum_other)).clamp_min(0.0)
    return d2 if squared else torch.sqrt(d2)


def _check_sums(sums: torch.Tensor, labels: list[str]) -> None:
    """Raise a clear error for empty, all-zero or invalid inputs, from the kernel's own counts."""
    values = sums.detach().cpu()
    if values[0, 3] > 0:
        raise ValueError(
            f"{labels[0]} has {int(values[0, 3])} negative, NaN or infinite entries; "
            "a diagonal FIM is finite and nonnegative (check the model's loss and gradients)"
        )
    if values[0, 0] <= 0:
        raise ValueError(
            f"{labels[0]} is all zeros (trace 0), so it cannot be normalised to unit trace"
        )
    for k in range(values.shape[0]):
        if values[k, 4] > 0:
            raise ValueError(
                f"{labels[k + 1]} has {int(values[k, 4])} negative, NaN or infinite entries; "
                "a diagonal FIM is finite and nonnegative (check the model's loss and gradients)"
            )
        if values[k, 1] <= 0:
            raise ValueError(
                f"{labels[k + 1]} is all zeros (trace 0), so it cannot be normalised to unit trace"
            )


def frechet_distances(
    reference: FIMLike, others: Sequence[FIMLike], *, squared: bool = False
) -> torch.Tensor:
    """Fréchet distances from one diagonal FIM to each of K others, as a (K,) float64 tensor.

    The reference is read from memory once per block of elements, not once per other FIM.
    Inputs are normalised to unit trace internally; each may be a tensor, a dict of named
    per-parameter tensors, a list of tensors or a :class:`fisher_fast.DiagFIM`.
    """
    if isinstance(others, (torch.Tensor, Mapping)) or not isinstance(others, Sequence):
        raise TypeError("others must be a list of FIMs; for a single pair use frechet_distance")
    if len(others) == 0:
        raise ValueError("others is empty: pass at least one FIM to compare with the reference")
    ref_names, ref = _as_tensor_list(reference, "the reference FIM")
    if any(t.numel() == 0 for t in ref) and sum(t.numel() for t in ref) == 0:
        raise ValueError("the reference FIM is empty (0 elements)")
    flat_others: list[torch.Tensor] = []
    for k, other in enumerate(others):
        names, tensors = _as_tensor_list(other, f"FIM {k}")
        flat_others += _align(ref_names, ref, names, tensors, f"FIM {k}")
    everything = _common_dtype(ref + flat_others)
    ref, flat_others = everything[: len(ref)], everything[len(ref) :]
    sums = ops.frechet_sums(ref, flat_others)
    _check_sums(sums, ["the reference FIM"] + [f"FIM {k}" for k in range(len(others))])
    return distances_from_sums(sums, squared)


def frechet_distance(F_a: FIMLike, F_b: FIMLike, *, squared: bool = False) -> torch.Tensor:
    """Fréchet distance (paper eq. 4) between two diagonal FIMs, a 0-dim float64 tensor in [0, 1].

    ``F_a`` and ``F_b`` are nonnegative diagonals given as tensors, matching dicts or lists of
    per-parameter tensors, or :class:`fisher_fast.DiagFIM` results; no concatenation copy is
    made. They are normalised to unit trace inside, so scaling either leaves d unchanged.
    ``squared=True`` returns d^2 (no square root), which keeps more relative precision near 0.

    Names in errors: ``F_a`` is the reference, ``F_b`` is "FIM 0".
    """
    try:
        return frechet_distances(F_a, [F_b], squared=squared)[0]
    except (ValueError, TypeError) as exc:
        message = str(exc).replace("the reference FIM", "F_a").replace("FIM 0", "F_b")
        raise type(exc)(message) from None


def frechet_distance_full(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Paper eq. 3 for full symmetric positive semi-definite matrices (small ones), float64.

    Both are normalised to unit trace, then
    ``d = sqrt(tr(A + B - 2 (A^1/2 B A^1/2)^1/2) / 2)``, with the matrix square roots from
    symmetric eigendecompositions (tr (AB)^1/2 = tr (A^1/2 B A^1/2)^1/2). Cost O(n^3): for
    checking the diagonal formula, not for real models.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape != B.shape:
        raise ValueError(
            f"A and B must be square matrices of one size, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    A = A / torch.trace(A)
    B = B / torch.trace(B)
    evals, evecs = torch.linalg.eigh((A + A.T) / 2)
    sqrt_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ B @ sqrt_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return torch.sqrt((torch.trace(A) + torch.trace(B) - 2 * cross).clamp_min(0) / 2)
