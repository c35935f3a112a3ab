"""The digits-clutter suite: digits on 16x16 canvases (cluttered or centred), fixed data, and
splits shared by the two sources so that no image crosses from one task's training split to
another's test split."""

from __future__ import annotations

import torch

from fisher_fast.tasks.loaders import centred_digits_source, cluttered_digits_source, digits_source
from fisher_fast.tasks.loaders.clutter import CANVAS, NOISE
from fisher_fast.tasks.suites import get_suite


def test_centred_digits_are_the_digits_in_the_middle_of_an_empty_canvas() -> None:
    digits = digits_source().data().train
    centred = centred_digits_source().data().train
    assert centred.x.shape == (len(digits.y), 1, CANVAS, CANVAS)
    at = (CANVAS - 8) // 2
    assert torch.equal(centred.x[:, :, at : at + 8, at : at + 8], digits.x)
    centred.x[:, :, at : at + 8, at : at + 8] = 0
    assert not centred.x.any()
    assert torch.equal(centred.y, digits.y)


def test_cluttered_digits_are_fixed_moved_and_noisy() -> None:
    digits = digits_source().data().train
    first, again = cluttered_digits_source().data().train, cluttered_digits_source().data().train
    assert torch.equal(first.x, again.x) and torch.equal(first.y, digits.y)
    x = first.x
    assert x.shape == (len(digits.y), 1, CANVAS, CANVAS)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Each digit is somewhere on its canvas: the best-matching 8x8 window differs from it by
    # about the noise only (the pasted fragments can only raise pixels where they land).
    windows = x.unfold(2, 8, 1).unfold(3, 8, 1)  # (N, 1, 9, 9, 8, 8)
    error = (windows - digits.x[:, :, None, None]).abs().mean((-1, -2)).flatten(1).min(1).values
    assert float(error.median()) < 1.5 * NOISE
    # ... and not always in the same place.
    best = (windows - digits.x[:, :, None, None]).abs().mean((-1, -2)).flatten(1).argmin(1)
    assert len(torch.unique(best)) > 40


def test_the_two_sources_split_the_same_images_the_same_way() -> None:
    cluttered = cluttered_digits_source().split(0.1, 0.25, 0)
    centred = centred_digits_source().split(0.1, 0.25, 0)
    for a, b in zip(cluttered, centred, strict=True):
        assert torch.equal(a.index, b.index)


def test_the_suite_is_embedded_with_four_tasks_on_one_input_shape() -> None:
    suite = get_suite("digits-clutter")
    assert [t.num_classes for t in suite.tasks] == [10, 2, 10, 2]
    shapes = {tuple(t.splits().train.x.shape[1:]) for t in suite.tasks}
    assert shapes == {(1, CANVAS, CANVAS)}
    assert suite.head_width == 10
