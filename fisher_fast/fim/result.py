"""DiagFIM: a diagonal Fisher information matrix held in one flat buffer with named views."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from fisher_fast._version import __version__
from fisher_fast.devices import resolve_device
from fisher_fast.io import atomic_write

FORMAT_VERSION = 1
"""Files of format 1 written before the checksum existed have no ``sha256`` field; they load
with a :class:`UncheckedFileWarning`."""

T = TypeVar("T")


class DiagFIMFileError(ValueError):
    """A DiagFIM file is unreadable, corrupted, or its metadata is incomplete."""


class UncheckedFileWarning(UserWarning):
    """A DiagFIM file carries no checksum (written by an older fisher_fast), so damage to its
    data cannot be detected."""


class DiagFIM:
    """Diagonal FIM of a model's trainable parameters, as one contiguous 1-D buffer.

    ``flat`` holds the diagonals of all parameters back to back, in ``names`` order; indexing by
    a parameter name (``fim["fc.weight"]``) gives a view shaped like that parameter. Values are
    averages over ``n_samples`` samples of squared per-sample gradients (units: loss² / param²).
    """

    def __init__(
        self,
        flat: torch.Tensor,
        names: list[str],
        shapes: list[tuple[int, ...]],
        *,
        n_samples: int,
        fisher: str,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if flat.dim() != 1:
            raise ValueError(f"flat must be 1-D, got shape {tuple(flat.shape)}")
        sizes = [math.prod(s) for s in shapes]
        if len(names) != len(shapes) or sum(sizes) != flat.numel():
            raise ValueError(
                f"{len(names)} names and shapes totalling {sum(sizes)} elements do not describe "
                f"a buffer of {flat.numel()} elements"
            )
        self.flat = flat
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.n_samples = int(n_samples)
        self.fisher = fisher
        self.meta = dict(meta or {})
        self._offsets = dict(zip(self.names, _offsets(sizes), strict=True))

    # -- views ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._offsets:
            raise KeyError(f"no parameter named {name!r}; known: {self.names[:8]}...")
        start, size = self._offsets[name]
        return self.flat[start : start + size].view(self.shapes[self.names.index(name)])

    def __contains__(self, name: object) -> bool:
        return name in self._offsets

    def __len__(self) -> int:
        return len(self.names)

    def keys(self) -> list[str]:
        return list(self.names)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self[name]

    def __repr__(self) -> str:
        return (
            f"DiagFIM({len(self.names)} tensors, {self.flat.numel()} entries, fisher={self.fisher!r}, "
            f"n_samples={self.n_samples}, dtype={self.flat.dtype}, device={self.flat.device})"
        )

    # -- arithmetic ----------------------------------------------------------------------------
    def trace(self) -> torch.Tensor:
        """Sum of all diagonal entries, a 0-dim float64 tensor."""
        return self.flat.sum(dtype=torch.float64)

    def normalized(self) -> DiagFIM:
        """A copy scaled to unit trace (the paper's normalisation)."""
        trace = self.trace()
        if not trace > 0:
            raise ValueError("the FIM's trace is zero, so it cannot be normalised to unit trace")
        return self._like((self.flat.double() / trace).to(self.flat.dtype))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DiagFIM:
        """A copy on another device and/or dtype."""
        return self._like(self.flat.to(device=device, dtype=dtype))

    def combine(self, other: DiagFIM) -> DiagFIM:
        """The FIM over the union of two disjoint data sets: a sample-weighted average."""
        if self.names != other.names or self.shapes != other.shapes:
            raise ValueError("cannot combine FIMs of different parameters")
        if self.fisher != other.fisher:
            raise ValueError(f"cannot combine a {self.fisher!r} FIM with a {other.fisher!r} FIM")
        total = self.n_samples + other.n_samples
        if total == 0:
            raise ValueError("both FIMs are over zero samples")
        flat = (self.flat * self.n_samples + other.flat.to(self.flat) * other.n_samples) / total
        out = self._like(flat)
        out.n_samples = total
        return out

    def _like(self, flat: torch.Tensor) -> DiagFIM:
        return DiagFIM(
            flat,
            self.names,
            self.shapes,
            n_samples=self.n_samples,
            fisher=self.fisher,
            meta=self.meta,
        )

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to a safetensors file atomically (:func:`fisher_fast.io.atomic_write`)."""
        from safetensors.torch import save_file

        metadata = {
            "format_version": str(FORMAT_VERSION),
            "fisher": self.fisher,
            "n_samples": str(self.n_samples),
            "names": json.dumps(self.names),
            "shapes": json.dumps(self.shapes),
            "fisher_fast_version": __version__,
            "torch_version": torch.__version__,
            "meta": json.dumps(self.meta),
        }
        flat = self.flat.detach().cpu().contiguous()
        metadata["sha256"] = data_sha256(flat)
        atomic_write(Path(path), lambda tmp: save_file({"flat": flat}, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> DiagFIM:
        """Read a file written by :meth:`save` onto ``device``, its data checked against the
        checksum stored at save time; a damaged or foreign file is a :class:`DiagFIMFileError`
        naming it. Files older than the checksum load with an :class:`UncheckedFileWarning`."""
        from safetensors import safe_open

        target = resolve_device(device, f"DiagFIM.load({str(path)!r})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                flat = f.get_tensor("flat")
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise DiagFIMFileError(
                f"{path} is not a readable DiagFIM file ({exc}); recompute it or copy it again"
            ) from exc
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise DiagFIMFileError(
                f"{path} has DiagFIM format {metadata.get('format_version')!r}; this version reads "
                f"format {FORMAT_VERSION}"
            )
        _verify(path, flat, metadata.get("sha256"))
        names = _field(path, metadata, "names", lambda t: [str(n) for n in json.loads(t)])
        shapes = _field(path, metadata, "shapes", _parse_shapes)
        n_samples = _field(path, metadata, "n_samples", int)
        fisher = _field(path, metadata, "fisher", str)
        meta = _field(path, metadata, "meta", lambda t: dict(json.loads(t)), default="{}")
        try:
            return cls(
                flat.to(target), names, shapes, n_samples=n_samples, fisher=fisher, meta=meta
            )
        except ValueError as exc:
            raise DiagFIMFileError(
                f"{path} is damaged: {exc}; recompute the FIM or copy the file again"
            ) from None


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in shape) for shape in json.loads(text)]


def data_sha256(flat: torch.Tensor) -> str:
    """SHA-256 of a contiguous CPU tensor's bytes (its dtype and length are in the metadata)."""
    return hashlib.sha256(flat.reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def _verify(path: str | os.PathLike[str], flat: torch.Tensor, stored: str | None) -> None:
    """Raise if ``flat`` does not match the checksum written with it; warn if there is none."""
    if stored is None:
        warnings.warn(
            f"{path} has no checksum (written by an older fisher_fast), so damage to its data "
            "cannot be detected; save it again to add one",
            UncheckedFileWarning,
            stacklevel=3,
        )
        return
    if data_sha256(flat) != stored:
        raise DiagFIMFileError(
            f"{path} is corrupted: its data does not match the checksum written with it; "
            "recompute the FIM or copy the file again"
        )


def _field(
    path: str | os.PathLike[str],
    metadata: dict[str, str],
    key: str,
    parse: Callable[[str], T],
    default: str | None = None,
) -> T:
    """Metadata field ``key`` parsed by ``parse``; missing or malformed: a DiagFIMFileError."""
    text = metadata.get(key, default)
    if text is None:
        raise DiagFIMFileError(
            f"{path} is incomplete: its metadata has no {key!r} field; it was not written by "
            "DiagFIM.save (or was damaged): recompute the FIM or copy the file again"
        )
    try:
        return parse(text)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise DiagFIMFileError(
            f"{path} is damaged: its metadata field {key!r} is malformed ({exc}); recompute "
            "the FIM or copy the file again"
        ) from None


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in sizes:
        out.append((start, size))
        start += size
    return out
