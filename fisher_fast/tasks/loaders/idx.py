"""MNIST (and any data set stored the same way) from the standard IDX files, gzipped or not.

IDX layout: two zero bytes, a type code, the number of dimensions, each dimension as a
big-endian uint32, then the values in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fisher_fast.part import Part
from fisher_fast.tasks.source import DataSource, SourceData, files_key, names_from_list

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
MNIST_SUBDIRS = (".", "MNIST/raw", "raw")


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` files are decompressed)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} holds {len(raw)} bytes but its header {shape} describes {expected}: truncated?"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def mnist_source(path: str | Path) -> DataSource:
    """MNIST from the four standard IDX files in ``path`` (or ``path/MNIST/raw``, ``path/raw``):
    images (N, 1, 28, 28) uint8, labels 0..9 named "0".."9"; the official test set is the test
    split."""
    files = _find_mnist(Path(path))
    return DataSource("mnist", files_key("mnist", files.values()), lambda: _load(files))


def _find_mnist(root: Path) -> dict[str, Path]:
    for sub in MNIST_SUBDIRS:
        found = {}
        for role, stem in MNIST_FILES.items():
            for name in (stem, stem + ".gz"):
                if (root / sub / name).is_file():
                    found[role] = root / sub / name
        if len(found) == len(MNIST_FILES):
            return found
    expected = ", ".join(f"{stem}[.gz]" for stem in MNIST_FILES.values())
    where = ", ".join(str(root / s) for s in MNIST_SUBDIRS)
    raise FileNotFoundError(
        f"MNIST not found: expected the four IDX files {expected} in one of {where}. "
        "fisher_fast does not download data; get them from the MNIST site (yann.lecun.com/exdb/mnist "
        "or a mirror) and pass their folder with --data."
    )


def _load(files: dict[str, Path]) -> SourceData:
    parts = []
    for split in ("train", "test"):
        x, y = read_idx(files[f"{split}_x"]), read_idx(files[f"{split}_y"])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{files[f'{split}_x']} and {files[f'{split}_y']} must hold (N, H, W) images and (N,) labels, "
                f"got shapes {x.shape} and {y.shape}"
            )
        parts.append(Part(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))))
    return SourceData(parts[0], parts[1], names_from_list([str(d) for d in range(10)]))
