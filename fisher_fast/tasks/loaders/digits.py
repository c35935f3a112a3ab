"""The 8x8 handwritten digits embedded in scikit-learn (1797 images, no download)."""

from __future__ import annotations

import torch

from fisher_fast.extras import require_module
from fisher_fast.part import Part
from fisher_fast.tasks.source import DataSource, SourceData, names_from_list


def digits_source() -> DataSource:
    """scikit-learn's digits as (N, 1, 8, 8) float32 in [0, 1] (pixel / 16), labels 0..9 named
    "0".."9". The data set has no official test part, so tasks split it themselves."""
    require_module("sklearn", "the digits data (they ship with scikit-learn)")
    import sklearn

    return DataSource("digits", f"sklearn-digits:{sklearn.__version__}", _load)


def _load() -> SourceData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return SourceData(Part(x, y), None, names_from_list([str(d) for d in range(10)]))
