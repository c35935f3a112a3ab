"""User-defined task suites from a small JSON file.

Example (paths are relative to the JSON file)::

    {
      "name": "my-tasks",
      "source": {"format": "npz", "path": "data.npz"},
      "arch": "cnn", "epsilon": 0.1,
      "train": {"epochs": 20, "lr": 0.001, "batch_size": 64},
      "task_defaults": {"balance": true, "val_fraction": 0.1, "test_fraction": 0.25, "data_seed": 0},
      "tasks": [
        {"name": "detect cat", "classes": [["cat"]], "other": true},
        {"name": "cat, dog, rest", "classes": ["cat", "dog"], "other": true},
        {"name": "all", "classes": [0, 1, 2, 3]}
      ]
    }

``classes`` lists the task's classes in task-label order: each entry is an original label
(integer), a label name the source knows, or a list of them forming one class. A task may name
its own ``source``. Source formats: ``digits`` and ``mnist5k`` (no path), ``mnist`` (IDX files), ``cifar10``,
``cifar100``, ``npz`` and ``folder`` (with optional ``classes`` {name: folder},
``images_per_class``, ``train_per_class``, ``image_size``, ``seed``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fisher_fast.tasks.loaders.cifar import cifar10_source, cifar100_source
from fisher_fast.tasks.loaders.digits import digits_source
from fisher_fast.tasks.loaders.folder import folder_source
from fisher_fast.tasks.loaders.idx import mnist_source
from fisher_fast.tasks.loaders.mnist5k import mnist5k_source
from fisher_fast.tasks.loaders.npz import npz_source
from fisher_fast.tasks.source import DataSource
from fisher_fast.tasks.suites import Suite
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.train import TrainConfig

FORMATS: dict[str, Callable[..., DataSource]] = {
    "digits": digits_source,
    "mnist5k": mnist5k_source,
    "mnist": mnist_source,
    "cifar10": cifar10_source,
    "cifar100": cifar100_source,
    "npz": npz_source,
    "folder": folder_source,
}
TOP_KEYS = {"name", "source", "arch", "epsilon", "train", "task_defaults", "tasks"}
TASK_KEYS = {
    "name",
    "classes",
    "other",
    "class_names",
    "source",
    "balance",
    "val_fraction",
    "test_fraction",
    "data_seed",
}


def load_task_config(path: str | Path) -> Suite:
    """The suite described by the JSON file at ``path`` (format in the module docstring)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the task file {path}: {exc}") from exc
    _check_keys(spec, TOP_KEYS, f"{path}")
    if not isinstance(spec.get("tasks"), list) or len(spec["tasks"]) < 2:
        raise ValueError(f"{path}: 'tasks' must list at least two tasks")
    sources: dict[str, DataSource] = {}

    def source_of(entry: Any, where: str) -> DataSource:
        if entry is None:
            raise ValueError(f"{where}: no 'source' (give one at the top level or in the task)")
        text = json.dumps(entry, sort_keys=True)
        if text not in sources:
            sources[text] = _make_source(entry, path.parent, where)
        return sources[text]

    defaults = spec.get("task_defaults", {})
    _check_keys(
        defaults, TASK_KEYS - {"name", "classes", "class_names", "source"}, f"{path}: task_defaults"
    )
    tasks = []
    for i, entry in enumerate(spec["tasks"]):
        where = f"{path}: task {i}"
        _check_keys(entry, TASK_KEYS, where)
        if "name" not in entry or "classes" not in entry:
            raise ValueError(f"{where}: every task needs a 'name' and 'classes'")
        options = {
            **defaults,
            **{k: v for k, v in entry.items() if k not in ("source", "name", "classes")},
        }
        tasks.append(
            Task(
                entry["name"],
                source_of(entry.get("source", spec.get("source")), where),
                entry["classes"],
                **options,
            )
        )
    try:
        train = TrainConfig(**spec.get("train", {}))
    except TypeError as exc:
        raise ValueError(
            f"{path}: bad 'train' settings ({exc}); allowed: {', '.join(TrainConfig.__dataclass_fields__)}"
        ) from exc
    return Suite(
        spec.get("name", path.stem),
        tuple(tasks),
        train,
        spec.get("arch", "mlp"),
        float(spec.get("epsilon", 0.1)),
    )


def _make_source(entry: Any, base: Path, where: str) -> DataSource:
    if not isinstance(entry, Mapping) or entry.get("format") not in FORMATS:
        raise ValueError(
            f"{where}: 'source' must be an object with 'format' one of {', '.join(FORMATS)}; got {entry!r}"
        )
    options = {k: v for k, v in entry.items() if k != "format"}
    if entry["format"] in ("digits", "mnist5k"):
        _check_keys(options, set(), f"{where}: {entry['format']} source")
        return FORMATS[entry["format"]]()
    if "path" not in options:
        raise ValueError(f"{where}: a {entry['format']!r} source needs a 'path'")
    options["path"] = base / options["path"]
    try:
        return FORMATS[entry["format"]](**options)
    except TypeError as exc:
        raise ValueError(f"{where}: bad options for a {entry['format']!r} source ({exc})") from exc


def _check_keys(entry: Any, allowed: set[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
