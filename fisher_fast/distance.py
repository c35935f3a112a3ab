"""Fréchet distance between diagonal Fisher information matrices (paper eq. 3 and 4).

With unit-trace diagonals a and b, eq. 4 is d = ||sqrt(a) - sqrt(b)||_2 / sqrt(2). Because both
sum to one, d^2 = 1 - sum_i sqrt(a_i b_i), so for raw diagonals A and B

    d^2 = max(0, 1 - sum_i sqrt(A_i B_i) / sqrt(sum A * sum B)),

three float64 sums from one pass over the data (the frechet_sums kernel). The normalisation to
unit trace therefore happens inside, and the result does not change when either input is scaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fisher_fast import ops


class HasFlatFIM(Protocol):
    """Anything holding a diagonal FIM as one flat tensor (e.g. :class:`fisher_fast.DiagFIM`).

    An object that also has ``names`` and ``shapes`` (as DiagFIM does) is matched with the
    other FIM by parameter name, like a dict; one without them is matched by position.
    """

    @property
    def flat(self) -> torch.Tensor: ...


FIMLike = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | HasFlatFIM


@dataclass(frozen=True)
class _Parts:
    """One FIM as the kernel reads it: contiguous tensors and, for a named FIM, its layout.

    ``tensors`` is either one tensor per name, or one flat buffer holding all of them back to
    back (a DiagFIM's ``flat``); ``shapes`` is the shape of each named parameter.
    """

    names: list[str] | None
    tensors: list[torch.Tensor]
    shapes: list[tuple[int, ...]] | None

    @property
    def is_flat_named(self) -> bool:
        """A named FIM held as one buffer (its per-name views exist only on request)."""
        return self.names is not None and len(self.tensors) != len(self.names)

    def split(self) -> _Parts:
        """The same FIM as one view per name (no copy)."""
        if not self.is_flat_named:
            return self
        assert self.names is not None and self.shapes is not None
        sizes = [math.prod(s) for s in self.shapes]
        views = [v.view(s) for v, s in zip(self.tensors[0].split(sizes), self.shapes, strict=True)]
        return _Parts(self.names, views, self.shapes)


def _parts(fim: Any, what: str) -> _Parts:
    """A FIM given in any accepted form, as :class:`_Parts`."""
    if isinstance(fim, torch.Tensor):
        return _Parts(None, [fim.contiguous()], None)
    if hasattr(fim, "flat") and isinstance(fim.flat, torch.Tensor):
        names, shapes = getattr(fim, "names", None), getattr(fim, "shapes", None)
        if names is None or shapes is None:
            return _Parts(None, [fim.flat.contiguous()], None)
        return _Parts(list(names), [fim.flat.contiguous()], [tuple(s) for s in shapes])
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
    shapes = None if names is None else [tuple(t.shape) for t in tensors]
    return _Parts(names, [t.contiguous() for t in tensors], shapes)


def _check_names(ref: _Parts, other: _Parts, what: str, ref_name: str) -> None:
    """Raise unless two named FIMs hold the same parameters with the same shapes, naming the
    first that differ. O(number of parameters), and two lists compared at C speed when equal."""
    assert ref.names is not None and other.names is not None
    if ref.names == other.names and ref.shapes == other.shapes:
        return
    known = set(other.names)
    missing = [n for n in ref.names if n not in known]
    known = set(ref.names)
    extra = [n for n in other.names if n not in known]
    if missing or extra:
        raise ValueError(
            f"{what} and {ref_name} name different parameters: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    assert ref.shapes is not None and other.shapes is not None
    theirs = dict(zip(other.names, other.shapes, strict=True))
    for name, shape in zip(ref.names, ref.shapes, strict=True):
        if theirs[name] == shape:
            continue
        if math.prod(theirs[name]) != math.prod(shape):
            raise ValueError(
                f"{what} {name!r} has {math.prod(theirs[name])} elements but the reference "
                f"has {math.prod(shape)}"
            )
        raise ValueError(
            f"{what} {name!r} has shape {theirs[name]} but the reference has {shape}; "
            "both FIMs must be of the same model"
        )


def _align(ref: _Parts, other: _Parts, what: str, ref_name: str) -> list[torch.Tensor]:
    """``other``'s tensors cut and ordered like ``ref``'s, after checking that both describe
    the same parameters (by name and shape when both are named, by size otherwise). ``what``
    and ``ref_name`` name the two FIMs in errors."""
    ref_names, names, tensors = ref.names, other.names, other.tensors
    if (ref_names is None) != (names is None):
        # One side is a flat tensor or list, the other a dict: compare flattened contents.
        if len(ref.tensors) == 1 or len(tensors) == 1:
            return _flattened_like(ref.tensors, tensors, what, ref_name)
        raise TypeError(
            f"{what} is a {'dict' if names else 'list'} but the reference is not; pass both alike"
        )
    if ref_names is not None and names is not None:
        _check_names(ref, other, what, ref_name)
        if not (names == ref_names and len(tensors) == len(ref.tensors)):
            by_name = dict(zip(names, other.split().tensors, strict=True))
            tensors = [by_name[n] for n in ref_names]
    _check_sizes(ref, tensors, what, ref_name)
    return tensors


def _flattened_like(
    ref: list[torch.Tensor], tensors: list[torch.Tensor], what: str, ref_name: str
) -> list[torch.Tensor]:
    """``tensors`` concatenated, and cut like ``ref`` when ``ref`` has several tensors."""
    ref_total = sum(t.numel() for t in ref)
    total = sum(t.numel() for t in tensors)
    if ref_total != total:
        raise ValueError(
            f"{what} has {total} elements but {ref_name} has {ref_total}; "
            "both must describe the same parameters"
        )
    flat = (
        tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
    )
    return [flat] if len(ref) == 1 else list(flat.split([t.numel() for t in ref]))


def _check_sizes(ref: _Parts, tensors: list[torch.Tensor], what: str, ref_name: str) -> None:
    if len(tensors) != len(ref.tensors):
        raise ValueError(
            f"{what} holds {len(tensors)} tensors but {ref_name} holds {len(ref.tensors)}"
        )
    for i, (r, t) in enumerate(zip(ref.tensors, tensors, strict=True)):
        label = (
            repr(ref.names[i])
            if ref.names and len(ref.names) == len(ref.tensors)
            else f"tensor {i}"
        )
        if r.numel() != t.numel():
            raise ValueError(
                f"{what} {label} has {t.numel()} elements but the reference has {r.numel()}"
            )
        if r.device != t.device:
            raise ValueError(
                f"{what} {label} is on {t.device} but the reference is on {r.device}; "
                "move both FIMs to one device"
            )


def _needs_views(ref: _Parts, other: _Parts) -> bool:
    """Whether ``other`` can only be matched with ``ref`` parameter by parameter (not as one
    buffer against one buffer): it is named, but held in pieces or in another order."""
    return other.names is not None and (other.names != ref.names or not other.is_flat_named)


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    dtype = tensors[0].dtype
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"FIM tensors must be floating point, got {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def distances_from_sums(sums: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Distances (K,) from the (K, 5) result of :func:`fisher_fast.ops.frechet_sums`, as tensor
    ops: traceable by ``torch.compile(fullgraph=True)``, and the sums stay on their device."""
    sum_ref, sum_other, cross = sums[:, 0], sums[:, 1], sums[:, 2]
    d2 = (1.0 - cross / torch.sqrt(sum_ref * sum_other)).clamp_min(0.0)
    return d2 if squared else torch.sqrt(d2)


def _distance_values(rows: list[list[float]], squared: bool) -> list[float]:
    """:func:`distances_from_sums` on sums already on the host as Python floats (the same
    float64 formula): a few microseconds, where tensor ops on K values take tens."""
    d2 = [max(0.0, 1.0 - cross / math.sqrt(ref * other)) for ref, other, cross, _, _ in rows]
    return d2 if squared else [math.sqrt(v) for v in d2]


def _check_sums(rows: list[list[float]], names: tuple[str, str]) -> None:
    """Raise a clear error for empty, all-zero or invalid inputs, from the kernel's own counts
    (``rows``: the (K, 5) sums as Python floats). ``names`` = (the reference's name, the
    others' name with ``{k}`` for the index); labels are only formatted for an error."""
    ref_total, _, _, ref_invalid, _ = rows[0]
    _check_fim(ref_total, ref_invalid, names[0], 0)
    for k, (_, total, _, _, invalid) in enumerate(rows):
        _check_fim(total, invalid, names[1], k)


def _check_fim(total: float, invalid: float, name: str, k: int) -> None:
    """Raise unless one FIM's kernel sums show a finite, nonnegative, nonzero diagonal;
    ``name`` (with ``{k}`` for the index ``k``, or without) is formatted only for an error."""
    if invalid > 0:
        raise ValueError(
            f"{name.format(k=k)} has {int(invalid)} negative, NaN or infinite entries; "
            "a diagonal FIM is finite and nonnegative (check the model's loss and gradients)"
        )
    if total <= 0:
        raise ValueError(
            f"{name.format(k=k)} is all zeros (trace 0), so it cannot be normalised to unit trace"
        )


def frechet_distances(
    reference: FIMLike, others: Sequence[FIMLike], *, squared: bool = False
) -> torch.Tensor:
    """Fréchet distances from one diagonal FIM to each of K others, as a (K,) float64 tensor.

    The reference is read from memory once per block of elements, not once per other FIM.
    Inputs are normalised to unit trace internally; each may be a tensor, a dict of named
    per-parameter tensors, a list of tensors or a :class:`fisher_fast.DiagFIM`.
    """
    values, device = _distances(reference, others, squared, ("the reference FIM", "FIM {k}"))
    return torch.tensor(values, dtype=torch.float64, device=device)


def _distances(
    reference: FIMLike, others: Sequence[FIMLike], squared: bool, names: tuple[str, str]
) -> tuple[list[float], torch.device]:
    """The distances of :func:`frechet_distances` as Python floats, and the FIMs' device.

    Every check of the inputs runs before the kernel; after it, only the sums' own checks and
    the final formula on K floats. ``names`` = (the reference's name in errors, the others'
    with ``{k}`` for the index).
    """
    if isinstance(others, (torch.Tensor, Mapping)) or not isinstance(others, Sequence):
        raise TypeError("others must be a list of FIMs; for a single pair use frechet_distance")
    if len(others) == 0:
        raise ValueError("others is empty: pass at least one FIM to compare with the reference")
    sums = ops.frechet_sums(
        *(_alike_tensors(reference, others) or _aligned(reference, others, names))
    )
    rows = sums.tolist()  # (K, 5), one copy to the host
    _check_sums(rows, names)
    return _distance_values(rows, squared), sums.device


def _alike_tensors(
    reference: FIMLike, others: Sequence[FIMLike]
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The kernel's two lists when every FIM is one nonempty contiguous floating tensor of the
    reference's size, dtype and device (nothing to align or convert), else None. After the
    kernel has streamed the data every Python step runs from cold caches (about ten times its
    usual cost), so this common case skips the general path's objects."""
    r = reference
    if not (isinstance(r, torch.Tensor) and r.is_floating_point() and r.is_contiguous()):
        return None
    n, dtype, device = r.numel(), r.dtype, r.device
    tensors = [o for o in others if isinstance(o, torch.Tensor)]
    alike = (
        n > 0
        and len(tensors) == len(others)
        and all(
            o.dtype == dtype and o.device == device and o.numel() == n and o.is_contiguous()
            for o in tensors
        )
    )
    return ([r], tensors) if alike else None


def _aligned(
    reference: FIMLike, others: Sequence[FIMLike], names: tuple[str, str]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The reference's tensors and every other's, cut and ordered alike and in one dtype, as
    the kernel takes them, after every check of names, sizes and devices."""
    ref_parts = _parts(reference, names[0])
    if sum(t.numel() for t in ref_parts.tensors) == 0:
        raise ValueError(f"{names[0]} is empty (0 elements)")
    parts = [_parts(other, names[1].format(k=k)) for k, other in enumerate(others)]
    if ref_parts.is_flat_named and any(_needs_views(ref_parts, p) for p in parts):
        ref_parts = ref_parts.split()
    flat_others: list[torch.Tensor] = []
    for k, p in enumerate(parts):
        flat_others += _align(ref_parts, p, names[1].format(k=k), names[0])
    ref = ref_parts.tensors
    everything = _common_dtype(ref + flat_others)
    return everything[: len(ref)], everything[len(ref) :]


def frechet_distance(F_a: FIMLike, F_b: FIMLike, *, squared: bool = False) -> torch.Tensor:
    """Fréchet distance (paper eq. 4) between two diagonal FIMs, a 0-dim float64 tensor in [0, 1].

    ``F_a`` and ``F_b`` are nonnegative diagonals given as tensors, matching dicts or lists of
    per-parameter tensors, or :class:`fisher_fast.DiagFIM` results; no concatenation copy is
    made. They are normalised to unit trace inside, so scaling either leaves d unchanged.
    ``squared=True`` returns d^2 (no square root), which keeps more relative precision near 0.

    Names in errors: ``F_a`` is the reference, ``F_b`` the other.
    """
    values, device = _distances(F_a, [F_b], squared, ("F_a", "F_b"))
    return torch.tensor(values[0], dtype=torch.float64, device=device)


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
