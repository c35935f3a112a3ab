"""Task: a classification problem defined on a data source by a class mapping (paper §4).

A task's class k gathers one or more original labels, named by integer label or by a name
from the source (e.g. ``"cat"``, or a CIFAR-100 superclass such as ``"vehicles_1"``); with
``other=True`` every remaining label forms one more class, "anything else", the last one.
Task label k is what the probe's head unit k is trained to predict.

Splits are seeded by ``data_seed`` and do not depend on the probe's seed, so every probe of
every trial sees the same train / validation / test samples (Definition 4 compares two networks
on the same test data X_b^(2)). The source is split first, once for all its tasks
(:meth:`DataSource.split`: an official test part is kept as the test part, the validation part
is carved out of the training part), and each task then takes its classes from each part and
balances each part on its own. So no sample is in the training split of one task and the
validation or test split of another task on the same source with the same split settings (a
:class:`~fisher_fast.tasks.suites.Suite` refuses tasks that split one source differently).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fisher_fast.part import Part
from fisher_fast.tasks.balance import DROPPED, balanced_indices, task_labels
from fisher_fast.tasks.source import SPLIT_SCHEME, DataSource, Subset

LabelRef = int | str
"""An original label: its integer value or a name the source knows."""


class TaskSplits(NamedTuple):
    """The three splits of a task; inputs are float32, labels are task labels 0..K-1."""

    train: Part
    val: Part
    test: Part


@dataclass(eq=False)
class Task:
    """A named classification task on a data source.

    Args:
        name: unique within a suite; used in tables, figures and cache file names.
        source: where the samples come from.
        classes: one entry per named task class: an original label, a name, or a list of them
            (e.g. ``[["automobile", "cat", "ship"]]`` is one class made of three).
        other: add an "anything else" class (the last task label) for all remaining labels.
        class_names: display names of the task classes (derived from ``classes`` by default).
        balance: apply the paper's balancing rule (see :mod:`fisher_fast.tasks.balance`) to the
            training and test data.
        val_fraction: fraction of the source's training data held out for validation (model
            selection), per original label.
        test_fraction: fraction of each original label held out for testing when the source
            has no official test part.
        data_seed: seed of the source's split and of the balancing subsample.
    """

    name: str
    source: DataSource
    classes: Sequence[LabelRef | Sequence[LabelRef]]
    other: bool = False
    class_names: Sequence[str] | None = None
    balance: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    data_seed: int = 0
    groups: tuple[tuple[LabelRef, ...], ...] = field(init=False)
    """``classes`` normalised: one tuple of label references per named class."""
    _splits: TaskSplits | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.groups = tuple(_as_group(c) for c in self.classes)
        if not self.groups or any(not g for g in self.groups):
            raise ValueError(
                f"task {self.name!r}: every class needs at least one label, got {self.classes}"
            )
        if self.num_classes < 2:
            raise ValueError(f"task {self.name!r} has one class; add other=True or a second class")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"task {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes "
                "(count the 'anything else' class too)"
            )
        for what, value in (
            ("val_fraction", self.val_fraction),
            ("test_fraction", self.test_fraction),
        ):
            if not 0 < value < 1:
                raise ValueError(f"task {self.name!r}: {what} must lie in (0, 1), got {value}")

    @classmethod
    def detector(
        cls, name: str, source: DataSource, positives: Sequence[LabelRef], **kwargs: Any
    ) -> Task:
        """A binary detector: task label 0 = any of ``positives``, 1 = anything else."""
        return cls(name, source, [list(positives)], other=True, **kwargs)

    @property
    def num_classes(self) -> int:
        """Number of task classes, counting "anything else"."""
        return len(self.groups) + int(self.other)

    @property
    def labels(self) -> list[str]:
        """Display name of each task label 0..K-1."""
        if self.class_names is not None:
            return list(self.class_names)
        names = ["+".join(map(str, group)) for group in self.groups]
        return [*names, "other"] if self.other else names

    @property
    def slug(self) -> str:
        """The name reduced to [a-z0-9-], for file names."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "task"

    def fingerprint(self) -> dict[str, Any]:
        """Everything that defines the task's data, for cache keys."""
        return {
            "name": self.name,
            "source": self.source.key,
            "classes": [list(g) for g in self.groups],
            "other": self.other,
            "balance": self.balance,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "data_seed": self.data_seed,
            "split": SPLIT_SCHEME,
        }

    def splits(self) -> TaskSplits:
        """Train / validation / test splits with task labels (computed once, then kept)."""
        if self._splits is None:
            self._splits = self._make_splits()
        return self._splits

    def split_settings(self) -> tuple[float, float, int]:
        """``(val_fraction, test_fraction, data_seed)``: tasks on one source with equal settings
        share the source's split."""
        return (self.val_fraction, self.test_fraction, self.data_seed)

    def _make_splits(self) -> TaskSplits:
        groups = self._resolve(self.source.data().names)
        parts = self.source.split(*self.split_settings())
        generator = torch.Generator().manual_seed(self.data_seed)
        return TaskSplits(
            train=self._select(parts.train, groups, generator, "training"),
            val=self._select(parts.val, groups, generator, "validation"),
            test=self._select(parts.test, groups, generator, "test"),
        )

    def _select(
        self, subset: Subset, groups: list[tuple[int, ...]], generator: torch.Generator, what: str
    ) -> Part:
        """The samples of ``subset`` this task uses, with task labels, balanced if asked."""
        labels = task_labels(subset.y, groups, self.other)
        for k in range(self.num_classes):
            if not bool((labels == k).any()):
                raise ValueError(
                    f"task {self.name!r}: class {k} ({self.labels[k]}) has no samples in the {what} "
                    f"part of {self.source.name!r}; check the class mapping"
                )
        if self.balance:
            keep = balanced_indices(labels, len(groups), self.other, generator)
        else:
            keep = (labels != DROPPED).nonzero().squeeze(1)
        part = subset.take(keep)
        x = part.x.float().div_(255.0) if part.x.dtype == torch.uint8 else part.x.float()
        return Part(x, labels[keep])

    def _resolve(self, names: Mapping[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Original labels of each class; names are looked up in the source's name table."""
        groups: list[tuple[int, ...]] = []
        owner: dict[int, int] = {}
        for k, group in enumerate(self.groups):
            labels: list[int] = []
            for ref in group:
                if isinstance(ref, str) and ref not in names:
                    known = ", ".join(sorted(names)) or "none (use integer labels)"
                    raise ValueError(
                        f"task {self.name!r}: {self.source.name!r} has no label named {ref!r}; known names: {known}"
                    )
                labels += list(names[ref]) if isinstance(ref, str) else [int(ref)]
            for label in labels:
                if owner.setdefault(label, k) != k:
                    raise ValueError(
                        f"task {self.name!r}: original label {label} is in class {owner[label]} and in class {k}; "
                        "each label may belong to one class only"
                    )
            groups.append(tuple(sorted(set(labels))))
        return groups


def _as_group(entry: LabelRef | Sequence[LabelRef]) -> tuple[LabelRef, ...]:
    if isinstance(entry, (int, str)):
        return (entry,)
    return tuple(entry)
