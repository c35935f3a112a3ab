"""User data from a NumPy ``.npz`` archive: ``x`` (N, ...), ``y`` (N,), optionally ``x_test``,
``y_test`` (an official test part) and ``label_names`` (the name of each label)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fisher_fast.part import Part
from fisher_fast.tasks.source import DataSource, SourceData, files_key, names_from_list


def npz_source(path: str | Path, name: str | None = None) -> DataSource:
    """A source over an ``.npz`` file (loaded without pickle: object arrays are refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; expected an .npz file with arrays x, y (and optionally x_test, y_test, label_names)"
        )
    return DataSource(name or path.stem, files_key("npz", [path]), lambda: _load(path))


def _load(path: Path) -> SourceData:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    missing = {"x", "y"} - set(arrays)
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise ValueError(
            f"{path} must hold arrays x and y, and x_test with y_test or neither; it holds {sorted(arrays)}"
        )
    train = Part(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"].astype(np.int64)))
    test = None
    if "x_test" in arrays:
        test = Part(
            torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64))
        )
    names = (
        names_from_list([str(n) for n in arrays["label_names"]]) if "label_names" in arrays else {}
    )
    return SourceData(train, test, names)
