"""Data sources: where a task's samples and their original labels come from.

A :class:`DataSource` loads, once and only when first needed, a :class:`SourceData`: a training
part, an optional official test part and a name table (label name -> original labels). Inputs
are tensors ``(N, C, H, W)`` (or ``(N, D)``), either uint8 images (0..255, scaled to [0, 1] when
a task's splits are built, which keeps large image sets at a quarter of the memory) or floating
point values used as they are; labels are integers ``(N,)``.

:meth:`DataSource.split` splits the source once into training / validation / test parts (seeded,
stratified by original label, kept for every task of the source), so that no sample is in the
training split of one task and the validation or test split of another task on the same source.

``key`` identifies the content for the run cache, so that a changed data set never reuses
probes trained on the old one: names, sizes and modification times for files on disk, a SHA-256
of the tensors for data given in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fisher_fast.part import Part, stratified_split


@dataclass(frozen=True)
class SourceData:
    """What a source loads: ``train``, the official ``test`` part if the data set has one, and
    ``names``: every label name the tasks may use, mapped to the original labels it covers (a
    class name covers one label, a superclass name such as CIFAR-100's ``vehicles_1`` several)."""

    train: Part
    test: Part | None = None
    names: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Subset:
    """The samples ``index`` (M,) int64 of ``part``, not copied until :meth:`take`."""

    part: Part
    index: torch.Tensor

    @property
    def y(self) -> torch.Tensor:
        """Original labels of the subset, (M,)."""
        return self.part.y[self.index]

    def take(self, keep: torch.Tensor) -> Part:
        """The samples ``keep`` (positions 0..M-1 within the subset) as a new part."""
        index = self.index[keep]
        return Part(self.part.x[index], self.part.y[index])


class SourceSplit(NamedTuple):
    """A source's samples split once for all its tasks: disjoint training, validation and test
    subsets (the test subset is the whole official test part when the data set has one)."""

    train: Subset
    val: Subset
    test: Subset


SPLIT_SCHEME = "per-source-stratified-v1"
"""Names how :meth:`DataSource.split` works, for cache keys: a change of scheme changes them."""


class DataSource:
    """A named, lazily loaded data set shared by the tasks defined on it."""

    def __init__(self, name: str, key: str, load: Callable[[], SourceData]) -> None:
        self.name = name
        self.key = key
        self._load = load
        self._data: SourceData | None = None
        self._splits: dict[tuple[float, float, int], SourceSplit] = {}

    def data(self) -> SourceData:
        """Load on first use (the result is kept: several tasks share one source)."""
        if self._data is None:
            self._data = self._load()
        return self._data

    def split(self, val_fraction: float, test_fraction: float, seed: int) -> SourceSplit:
        """The source's training / validation / test subsets, the same for every task that
        asks with the same settings (computed once, then kept).

        Without an official test part, ``test_fraction`` of each original label's samples
        (seeded by ``seed``) form the test subset; then ``val_fraction`` of each label's
        remaining training samples form the validation subset. With an official test part,
        that part is the test subset and ``test_fraction`` is not used.
        """
        settings = (val_fraction, test_fraction, seed)
        if settings not in self._splits:
            self._splits[settings] = split_data(self.data(), *settings)
        return self._splits[settings]

    def __repr__(self) -> str:
        return f"DataSource({self.name!r}, key={self.key[:40]!r})"

    @classmethod
    def from_tensors(
        cls,
        name: str,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        x_test: torch.Tensor | None = None,
        y_test: torch.Tensor | None = None,
        label_names: Sequence[str] | None = None,
    ) -> DataSource:
        """A source from tensors in memory: ``x`` (N, ...) inputs, ``y`` (N,) original labels,
        an optional official test part, and optional names (``label_names[i]`` names label i)."""
        if (x_test is None) != (y_test is None):
            raise ValueError("pass both x_test and y_test, or neither")
        train = Part(x, y.long())
        test = None if x_test is None or y_test is None else Part(x_test, y_test.long())
        data = SourceData(train, test, names_from_list(label_names))
        parts = [train] if test is None else [train, test]
        key = f"tensors:{name}:{tensors_sha256(t for p in parts for t in (p.x, p.y))}"
        return cls(name, key, lambda: data)

    @classmethod
    def from_dataset(
        cls,
        name: str,
        train: Iterable[tuple[Any, Any]],
        test: Iterable[tuple[Any, Any]] | None = None,
        *,
        label_names: Sequence[str] | None = None,
    ) -> DataSource:
        """A source from map-style datasets yielding ``(input, label)`` pairs (e.g. a
        ``torch.utils.data.Dataset``); every sample is read once and stacked."""
        x, y = _stack(train)
        x_test, y_test = _stack(test) if test is not None else (None, None)
        return cls.from_tensors(name, x, y, x_test=x_test, y_test=y_test, label_names=label_names)


def split_data(
    data: SourceData, val_fraction: float, test_fraction: float, seed: int
) -> SourceSplit:
    """:meth:`DataSource.split` of loaded data (stratified by original label, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(data.train))
    if data.test is None:
        held, kept = stratified_split(data.train.y, test_fraction, generator)
        test, pool = Subset(data.train, held), kept
    else:
        test = Subset(data.test, torch.arange(len(data.test)))
    held, kept = stratified_split(data.train.y[pool], val_fraction, generator)
    return SourceSplit(Subset(data.train, pool[kept]), Subset(data.train, pool[held]), test)


def names_from_list(label_names: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``{name: (label,)}`` from a list whose i-th entry names label i."""
    if label_names is None:
        return {}
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"label names must be unique, got {list(label_names)}")
    return {str(n): (i,) for i, n in enumerate(label_names)}


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of dtypes, shapes and bytes of tensors, in order (a content key)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def files_key(kind: str, files: Iterable[Path], **options: Any) -> str:
    """A content key for files on disk: resolved paths, sizes, modification times, options."""
    digest = hashlib.sha256(repr(sorted(options.items())).encode())
    for f in files:
        st = os.stat(f)
        digest.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{kind}:{digest.hexdigest()}"


def _stack(dataset: Iterable[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for item in dataset:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"a dataset must yield (input, label) pairs, got {type(item).__name__}")
        x = item[0]
        xs.append(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)))
        ys.append(int(item[1]))
    if not xs:
        raise ValueError("the dataset is empty")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
