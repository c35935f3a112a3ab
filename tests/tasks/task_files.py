"""Shared by the task tests: writers of tiny data files in each supported format and a tiny
synthetic data source."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fisher_fast.tasks import DataSource, Task

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_mnist(
    root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """The four MNIST files with random 28x28 images and labels cycling through 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), array)
    return arrays


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-10-batches-py with five tiny data batches, a test batch and the meta file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        _dump(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data})
        batches[name] = data
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return batches


CIFAR100_COARSE = [
    "vehicles_1",
    "vehicles_2",
    "household_furniture",
    "household_electrical_devices",
    "people",
]
CIFAR100_FINE = {
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "people": ["baby", "boy", "girl", "man", "woman"],
}


def write_cifar100(root: Path, per_fine: int = 4, seed: int = 0) -> None:
    """cifar-100-python with 25 fine classes in 5 superclasses (a subset of the real ones)."""
    rng = np.random.default_rng(seed)
    fine_names = [f for c in CIFAR100_COARSE for f in CIFAR100_FINE[c]]
    fine = np.repeat(np.arange(len(fine_names)), per_fine)
    coarse = fine // 5
    for split in ("train", "test"):
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        _dump(
            root / "cifar-100-python" / split,
            {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()},
        )
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE],
    }
    _dump(root / "cifar-100-python" / "meta", meta)


def write_image_folder(
    root: Path, folders: list[str], per_class: int, size: tuple[int, int] = (12, 10)
) -> None:
    """PNG images of one solid colour per class: class i has red value 10 * i."""
    from PIL import Image

    for i, folder in enumerate(folders):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", size, (10 * i, j, 200)).save(root / folder / f"img{j}.png")


def blob_source(
    n_per_class: int = 24, classes: int = 4, seed: int = 0, name: str = "blobs"
) -> DataSource:
    """Easily separable (N, 1, 4, 4) inputs: class c is noise around a class-specific pattern."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 1, 4, 4, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + 0.3 * torch.randn(len(y), 1, 4, 4, generator=g)
    return DataSource.from_tensors(name, x, y, label_names=[f"c{i}" for i in range(classes)])


def leaks(tasks: Sequence[Task]) -> dict[tuple[str, str, str], int]:
    """For each ordered pair of tasks (a, b) and each of b's held-out splits: how many of its
    images are also in a's training split, found by hashing the image rows
    (``{(a, b, "test" or "val"): count}``, only nonzero counts). Within a task too (a == b)."""
    splits = {t.name: t.splits() for t in tasks}
    rows = {
        (name, what): {r.numpy().tobytes() for r in getattr(s, what).x.flatten(1)}
        for name, s in splits.items()
        for what in ("train", "val", "test")
    }
    counts = {
        (a, b, what): len(rows[a, "train"] & rows[b, what])
        for a in splits
        for b in splits
        for what in ("val", "test")
    }
    return {k: n for k, n in counts.items() if n}
