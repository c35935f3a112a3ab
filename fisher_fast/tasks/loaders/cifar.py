"""CIFAR-10 and CIFAR-100 from the standard "python version" pickle batches.

The pickles are read with an unpickler that only builds plain containers and numpy arrays, so a
tampered file cannot run code. Images become (N, 3, 32, 32) uint8; the official test batch is
the test split.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fisher_fast.part import Part
from fisher_fast.tasks.source import DataSource, SourceData, files_key, names_from_list

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR100_DIR = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


def cifar10_source(path: str | Path) -> DataSource:
    """CIFAR-10 from ``path`` or ``path/cifar-10-batches-py``: data_batch_1..5, test_batch and
    batches.meta. Labels 0..9, named by batches.meta (airplane, automobile, ..., truck)."""
    root = _find(Path(path), CIFAR10_DIR, CIFAR10_FILES, "CIFAR-10")
    files = [root / f for f in CIFAR10_FILES]
    return DataSource("cifar10", files_key("cifar10", files), lambda: _load_cifar10(root))


def cifar100_source(path: str | Path) -> DataSource:
    """CIFAR-100 from ``path`` or ``path/cifar-100-python``: train, test and meta. Labels are
    the 100 fine labels; names are the fine names and the 20 superclass names (from meta), a
    superclass name covering its five fine labels."""
    root = _find(Path(path), CIFAR100_DIR, CIFAR100_FILES, "CIFAR-100")
    files = [root / f for f in CIFAR100_FILES]
    return DataSource("cifar100", files_key("cifar100", files), lambda: _load_cifar100(root))


def _find(root: Path, subdir: str, names: tuple[str, ...], what: str) -> Path:
    for candidate in (root, root / subdir):
        if all((candidate / n).is_file() for n in names):
            return candidate
    raise FileNotFoundError(
        f"{what} not found: expected the python-version files {', '.join(names)} in {root} or "
        f"{root / subdir}. fisher_fast does not download data; get the 'python version' archive "
        "from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass its folder with --data."
    )


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not part of a CIFAR batch"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the originals are Python 2 pickles, bytes keys)."""
    try:
        with path.open("rb") as f:
            raw = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"{path} is not a readable CIFAR batch ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path} is not a CIFAR batch: it holds a {type(raw).__name__}, not a dict"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _images(batch: dict[str, Any], path: Path) -> torch.Tensor:
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _labels(batch: dict[str, Any], key: str, path: Path) -> torch.Tensor:
    if key not in batch:
        raise ValueError(f"{path} has no {key!r} entry (keys: {sorted(batch)})")
    return torch.tensor(np.asarray(batch[key], dtype=np.int64))


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    if key not in meta:
        raise ValueError(f"{path} has no {key!r} entry (keys: {sorted(meta)})")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _load_cifar10(root: Path) -> SourceData:
    def part(names: list[str]) -> Part:
        batches = [(_unpickle(root / n), root / n) for n in names]
        x = torch.cat([_images(b, p) for b, p in batches])
        return Part(x, torch.cat([_labels(b, "labels", p) for b, p in batches]))

    label_names = _names(_unpickle(root / "batches.meta"), "label_names", root / "batches.meta")
    return SourceData(
        part(list(CIFAR10_FILES[:5])), part(["test_batch"]), names_from_list(label_names)
    )


def _load_cifar100(root: Path) -> SourceData:
    meta = _unpickle(root / "meta")
    fine_names = _names(meta, "fine_label_names", root / "meta")
    coarse_names = _names(meta, "coarse_label_names", root / "meta")
    parts: list[Part] = []
    fine_to_coarse: dict[int, int] = {}
    for split in ("train", "test"):
        batch = _unpickle(root / split)
        fine, coarse = (
            _labels(batch, "fine_labels", root / split),
            _labels(batch, "coarse_labels", root / split),
        )
        fine_to_coarse.update(zip(fine.tolist(), coarse.tolist(), strict=True))
        parts.append(Part(_images(batch, root / split), fine))
    names = names_from_list(fine_names)
    for c, coarse_name in enumerate(coarse_names):
        names[coarse_name] = tuple(sorted(f for f, cc in fine_to_coarse.items() if cc == c))
    return SourceData(parts[0], parts[1], names)
