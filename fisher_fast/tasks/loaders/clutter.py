"""Digits on a larger canvas, for a target where the searched cell matters: scikit-learn's 8x8
digits (embedded, no download) either at a random place among fragments of other digits and
noise ("cluttered"), or centred on an empty canvas ("centred").

On the plain 8x8 digits every cell of the search space reaches 97-99% and the restricted space
cannot show an advantage (README, "Restricted versus full space"); finding a digit that may be
anywhere among digit-like strokes needs translation-tolerant operations, which a cell may or may
not have. Both sources keep the digits' order and labels, so tasks on either split the same
images the same way (the splits depend on the labels and the seed only): no image is in the
training split of one task and in the test split of another.
"""

from __future__ import annotations

import torch

from fisher_fast.part import Part
from fisher_fast.tasks.loaders.digits import digits_source
from fisher_fast.tasks.source import DataSource, SourceData

CANVAS = 16  # side of the canvas in pixels (the digits are 8x8)
FRAGMENTS = 3  # pieces of other digits pasted around the digit
FRAGMENT_SIZE = 4  # side of a piece in pixels
NOISE = 0.1  # standard deviation of the Gaussian pixel noise of the cluttered canvas
SEED = 0  # placements, fragments and noise are drawn from this seed: the data are fixed


def cluttered_digits_source() -> DataSource:
    """(1797, 1, 16, 16) float32 in [0, 1]: each digit at a uniformly drawn offset, with
    ``FRAGMENTS`` random 4x4 pieces of other digits pasted at random places (taking the maximum
    with what is there) and clipped Gaussian noise; labels 0..9 as in the digits."""
    digits = digits_source()
    return DataSource(
        "cluttered digits",
        f"cluttered:{digits.key}:{CANVAS}:{FRAGMENTS}:{FRAGMENT_SIZE}:{NOISE}:{SEED}",
        lambda: _cluttered(digits.data()),
    )


def centred_digits_source() -> DataSource:
    """(1797, 1, 16, 16) float32 in [0, 1]: each digit in the middle of an empty canvas."""
    digits = digits_source()
    return DataSource(
        "centred digits", f"centred:{digits.key}:{CANVAS}", lambda: _centred(digits.data())
    )


def _centred(data: SourceData) -> SourceData:
    x = data.train.x
    side = x.shape[-1]
    at = (CANVAS - side) // 2
    canvas = torch.zeros(x.shape[0], 1, CANVAS, CANVAS)
    canvas[:, :, at : at + side, at : at + side] = x
    return SourceData(Part(canvas, data.train.y), None, data.names)


def _cluttered(data: SourceData) -> SourceData:
    x = data.train.x
    n, side = x.shape[0], x.shape[-1]
    generator = torch.Generator().manual_seed(SEED)
    canvas = torch.zeros(n, 1, CANVAS, CANVAS)
    reach, piece = CANVAS - side + 1, FRAGMENT_SIZE
    rows, cols = (torch.randint(reach, (n,), generator=generator) for _ in range(2))
    for i in range(n):
        canvas[i, :, rows[i] : rows[i] + side, cols[i] : cols[i] + side] = x[i]
    for _ in range(FRAGMENTS):
        donors = torch.randint(n, (n,), generator=generator)
        src_r, src_c = (
            torch.randint(side - piece + 1, (n,), generator=generator) for _ in range(2)
        )
        dst_r, dst_c = (
            torch.randint(CANVAS - piece + 1, (n,), generator=generator) for _ in range(2)
        )
        for i in range(n):
            fragment = x[donors[i], :, src_r[i] : src_r[i] + piece, src_c[i] : src_c[i] + piece]
            region = canvas[i, :, dst_r[i] : dst_r[i] + piece, dst_c[i] : dst_c[i] + piece]
            region.copy_(torch.maximum(region, fragment))
    noisy = canvas + NOISE * torch.randn(canvas.shape, generator=generator)
    return SourceData(Part(noisy.clamp_(0.0, 1.0), data.train.y), None, data.names)
