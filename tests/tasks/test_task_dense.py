"""The image-to-image study (§4.4): filters, tasks, the autoencoder probe, the study, the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import random

import numpy as np
import pytest
import torch
from fim_reference import reference_fim, relative_error

import fisher_fast
from fisher_fast.cli import main
from fisher_fast.tasks.dense import filters
from fisher_fast.tasks.dense import training as dense_training
from fisher_fast.tasks.dense.probe import AutoencoderProbe, autoencoder_widths, make_autoencoder
from fisher_fast.tasks.dense.ranks import rank_agreement, spearman
from fisher_fast.tasks.dense.study import dense_study
from fisher_fast.tasks.dense.suite import DenseSuite, ImageTask, image_tasks
from fisher_fast.tasks.dense.training import evaluate_regression, train_autoencoder
from fisher_fast.tasks.source import DataSource
from fisher_fast.tasks.train import EpsilonWarning, TrainConfig

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # random images are not learnable in two epochs; test_a_probe_below_1_minus_epsilon_warns
    # checks the warning itself
    pytest.mark.filterwarnings("ignore::fisher_fast.tasks.train.EpsilonWarning"),
]
needs_plots = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib draws the figures"
)


# --- filters ----------------------------------------------------------------------------------


def test_gaussian_blur_keeps_constants_and_the_mean_of_a_periodic_image(gen) -> None:
    constant = torch.full((2, 3, 9, 11), 0.37)
    assert torch.allclose(filters.gaussian_blur(constant, 1.5), constant, atol=1e-6)
    assert float(filters.gaussian_kernel(0.8).sum()) == pytest.approx(1.0)
    noisy = torch.rand(1, 1, 32, 32, generator=gen)
    blurred = filters.gaussian_blur(noisy, 2.0)
    assert float(blurred.std()) < 0.5 * float(noisy.std())  # smoothing removes most noise


def test_sobel_edges_measure_the_slope_of_a_ramp_and_vanish_on_flat_parts() -> None:
    ramp = torch.arange(12.0).repeat(12, 1)[None, None] * 0.05  # slope 0.05 per pixel along x
    edges = filters.edge_strength(ramp)
    assert torch.allclose(edges[..., 2:-2, 2:-2], torch.full((8, 8), 0.05), atol=1e-6)
    step = torch.zeros(1, 1, 10, 10)
    step[..., 5:] = 1.0
    edges = filters.edge_strength(step)
    assert float(edges[0, 0, 5, 4]) > 0.4 and float(edges[0, 0, 5, 0]) == 0.0


def test_harris_responds_at_a_corner_not_along_an_edge_or_a_flat_region() -> None:
    square = torch.zeros(1, 1, 24, 24)
    square[..., 8:, 8:] = 1.0  # one corner at (8, 8), edges along row 8 and column 8
    response = filters.harris_response(square)[0, 0]
    assert float(response[7:10, 7:10].max()) > 0
    assert float(response[8, 20]) == 0.0 and float(response[20, 8]) == 0.0
    assert float(response[2, 2]) == 0.0 and float(response[20, 20]) == 0.0


def test_laplacian_of_gaussian_is_zero_on_a_plane_and_signed_at_a_dot() -> None:
    plane = (torch.arange(16.0)[:, None] + 2 * torch.arange(16.0)[None, :])[None, None] / 50
    assert float(filters.laplacian_of_gaussian(plane)[..., 4:-4, 4:-4].abs().max()) < 1e-5
    dot = torch.zeros(1, 1, 15, 15)
    dot[..., 7, 7] = 1.0
    assert float(filters.laplacian_of_gaussian(dot)[0, 0, 7, 7]) < 0  # a bright peak


def test_mask_square_zeroes_one_square_inside_the_central_half_per_image(gen) -> None:
    images = torch.rand(20, 1, 28, 28, generator=gen) + 0.1  # no zeros of their own
    masked = filters.mask_square(images, 10, torch.Generator().manual_seed(3))
    holes = masked == 0
    assert holes.flatten(1).sum(1).tolist() == [100] * 20
    rows = holes.any(3).squeeze(1)
    assert (
        int(rows.float().argmax(1).min()) >= 7
        and int((27 - rows.flip(1).float().argmax(1)).max()) <= 20
    )
    again = filters.mask_square(images, 10, torch.Generator().manual_seed(3))
    assert torch.equal(masked, again)
    with pytest.raises(ValueError, match="mask side"):
        filters.mask_square(images, 28, gen)


# --- suite ------------------------------------------------------------------------------------


def tiny_source(n: int = 120, side: int = 8, seed: int = 0) -> DataSource:
    """Random uint8 images with 4 labels (only for the stratified split)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, side, side), generator=g, dtype=torch.uint8)
    return DataSource.from_tensors("tiny", x, torch.arange(n) % 4)


def tiny_suite(tasks: int = 3, **options) -> DenseSuite:
    options.setdefault("train", TrainConfig(epochs=2, batch_size=32, lr=3e-3))
    options.setdefault("transfer_epochs", 1)
    return DenseSuite("tiny-dense", tiny_source(), image_tasks()[:tasks], **options)


def test_every_task_uses_the_same_images_split_once_with_unit_rms_targets() -> None:
    suite = DenseSuite("tiny-dense", tiny_source(side=28), image_tasks())
    auto, deblur, edges = (
        suite.splits(t) for t in (suite.tasks[0], suite.tasks[5], suite.tasks[2])
    )
    # the same test images: autoencoding's input is deblurring's target (both unit-RMS scaled
    # by the same training images) and edges' input
    assert torch.equal(auto.test.x, edges.test.x)
    assert torch.allclose(auto.test.y, deblur.test.y)
    for task in suite.tasks:
        splits = suite.splits(task)
        assert float(splits.train.y.square().mean().sqrt()) == pytest.approx(1.0, rel=1e-5)
        assert splits.train.x.shape[1:] == splits.train.y.shape[1:] == (1, 28, 28)
    parts = suite.source.split(suite.val_fraction, suite.test_fraction, suite.data_seed)
    train, val, test = (set(p.index.tolist()) for p in parts)
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train | val | test) == 120


def test_degraded_inputs_are_drawn_once_per_split_and_task() -> None:
    first = DenseSuite("a", tiny_source(side=28), image_tasks())
    second = DenseSuite("a", tiny_source(side=28), image_tasks())
    noisy = first.tasks[1]
    assert torch.equal(first.splits(noisy).test.x, second.splits(noisy).test.x)
    assert not torch.equal(first.splits(noisy).test.x, first.splits(first.tasks[0]).test.x)


def test_suite_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="uniquely named"):
        DenseSuite("x", tiny_source(), (ImageTask("a", "a"), ImageTask("a", "b")))
    with pytest.raises(ValueError, match="epsilon"):
        DenseSuite("x", tiny_source(), image_tasks()[:2], epsilon=1.5)


# --- probe ------------------------------------------------------------------------------------


def test_autoencoder_widths_follow_the_paper_at_its_size_and_shrink_with_the_image() -> None:
    assert autoencoder_widths((3, 512, 512)) == (512, 128)  # appendix A: 262144 -> 512 -> 128
    assert autoencoder_widths((1, 28, 28)) == (256, 64)
    with torch.device("meta"):  # the paper's size: 134 M weights, not allocated
        probe = make_autoencoder((3, 512, 512))
    conv, _, _, first, _, code = probe.encoder
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        3, 16, (5, 5), (4, 4), (2, 2),
    )  # fmt: skip
    assert (first.in_features, first.out_features, code.out_features) == (262144, 512, 128)
    with pytest.raises(ValueError, match="multiples of 4"):
        make_autoencoder((1, 30, 30))


def test_the_probe_maps_images_to_images_and_its_regression_fisher_is_exact(gen) -> None:
    torch.manual_seed(random.getrandbits(31))
    model = AutoencoderProbe((1, 12, 12), 32, 8).double()
    x = torch.rand(10, 1, 12, 12, generator=gen, dtype=torch.float64)
    y = torch.rand(10, 1, 12, 12, generator=gen, dtype=torch.float64)
    assert model(x).shape == x.shape
    fim = fisher_fast.diag_fim(
        model, (x, y), loss="mse", batch_size=4, progress=False, dtype=torch.float64
    )
    reference = reference_fim(model, x, y, loss="mse")
    assert relative_error(fim.flat, reference) < 1e-10
    single = fisher_fast.diag_fim(model.float(), (x.float(), y.float()), loss="mse", progress=False)
    assert relative_error(single.flat, reference) < 1e-5
    report = fisher_fast.check(model, (x.float(), y.float()), loss="mse", verbose=False)
    assert report.ok and {row.path for row in report.rows} == {"rule conv_rule", "rule linear_rule"}


def test_r2_is_one_for_a_perfect_model_and_zero_for_the_mean(gen) -> None:
    from fisher_fast.tasks.dense.suite import Pairs

    y = torch.rand(30, 1, 4, 4, generator=gen)
    pairs = Pairs(y.clone(), y)
    perfect = evaluate_regression(torch.nn.Identity(), pairs, "cpu")
    assert perfect.r2 == pytest.approx(1.0) and perfect.mse == pytest.approx(0.0)
    mean = torch.full_like(y, float(y.mean()))
    flat = evaluate_regression(torch.nn.Identity(), Pairs(mean, y), "cpu")
    # The mean and the prediction's errors are float32: their rounding moves R² by up to ~1e-8.
    assert flat.r2 == pytest.approx(0.0, abs=1e-7)
    assert flat.mse == pytest.approx(float((y - y.mean()).square().mean()), rel=1e-6)


@pytest.mark.filterwarnings("error::fisher_fast.tasks.train.EpsilonWarning")
def test_a_probe_below_1_minus_epsilon_warns() -> None:
    suite = tiny_suite(2)
    with pytest.warns(EpsilonWarning, match="not an ε-approximation network"):
        probe = train_autoencoder(suite, suite.tasks[1], seed=0)
    assert probe.test.r2 < 1 - suite.epsilon and probe.best_epoch in (1, 2)


# --- rank agreement -----------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties(gen) -> None:
    stats = pytest.importorskip("scipy.stats")
    x = torch.randint(0, 6, (40,), generator=gen).double().numpy()
    y = (x + torch.randn(40, generator=gen).double().numpy() * 2).round()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_rank_agreement_of_a_perfectly_reversed_order(gen) -> None:
    k = 5
    distance = torch.rand(k, k, generator=gen, dtype=torch.float64)
    gain = 1.0 - 2.0 * distance  # closer always transfers better
    agreement = rank_agreement(distance, gain)
    assert agreement["spearman"] == pytest.approx(-1.0)
    assert agreement["p_value"] < 1e-3 and agreement["pairs"] == 20
    assert agreement["per_target"] == pytest.approx([-1.0] * k)
    assert agreement["same_closest"] == k
    unrelated = rank_agreement(distance, torch.rand(k, k, generator=gen, dtype=torch.float64))
    assert unrelated["p_value"] > agreement["p_value"]


# --- the study ----------------------------------------------------------------------------------


@needs_plots
def test_study_runs_caches_and_resumes(tmp_path, monkeypatch) -> None:
    suite = tiny_suite()
    result = dense_study(suite, seeds=2, out=tmp_path, progress=False)
    k = len(suite.tasks)
    assert result.distance.shape == (2, k, k) and result.transfer.shape == (2, k, k)
    assert torch.all(result.distance.diagonal(dim1=1, dim2=2) == 0)
    off = ~torch.eye(k, dtype=torch.bool)
    assert torch.all(result.distance[:, off] > 0) and torch.all(result.distance <= 1)
    assert torch.all(result.scratch > 0) and torch.all(result.test_r2 >= 0)
    saved = json.loads((tmp_path / "dense-empirical.json").read_text())
    assert torch.equal(
        torch.tensor(saved["distance_mean"], dtype=torch.float64), result.distance_mean
    )
    assert saved["agreement"]["pairs"] == k * (k - 1)
    assert (tmp_path / "dense-empirical.png").stat().st_size > 0
    assert (tmp_path / "dense-empirical-ranks.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was recomputed")

    monkeypatch.setattr(dense_training, "train_autoencoder", no_training)
    monkeypatch.setattr(dense_training, "transfer_mse", no_training)
    again = dense_study(tiny_suite(), seeds=2, out=tmp_path, progress=False)
    assert torch.equal(again.distance, result.distance) and torch.equal(again.gain, result.gain)
    with pytest.raises(ValueError, match="other settings"):
        dense_study(tiny_suite(transfer_epochs=2), seeds=2, out=tmp_path, progress=False)


def test_study_is_reproducible_and_probes_are_resumed_within_a_trial(tmp_path, monkeypatch) -> None:
    first = dense_study(tiny_suite(2), seeds=[4], progress=False)
    second = dense_study(tiny_suite(2), seeds=[4], progress=False)
    assert torch.equal(first.distance, second.distance)
    assert torch.equal(first.transfer, second.transfer)
    with pytest.raises(ValueError, match="fisher"):
        dense_study(tiny_suite(2), seeds=1, fisher="wrong", progress=False)
    with pytest.raises(ValueError, match="seeds is empty"):
        dense_study(tiny_suite(2), seeds=[], progress=False)


def test_mc_regression_fisher_gives_a_matrix_too() -> None:
    result = dense_study(tiny_suite(2), seeds=1, fisher="mc", progress=False)
    assert result.fisher == "mc" and float(result.distance[0, 1, 0]) > 0


@needs_plots
def test_cli_runs_a_dense_suite_and_refuses_what_it_does_not_take(
    tmp_path, monkeypatch, capsys
) -> None:
    from fisher_fast.tasks.dense.suite import DENSE_SUITES

    monkeypatch.setitem(DENSE_SUITES, "mnist5k-dense", lambda: tiny_suite(2))
    out = tmp_path / "run"
    code = main(
        [
            "distance",
            "--suite",
            "mnist5k-dense",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "Spearman ρ" in printed and "transfer gain" in printed
    assert (out / "dense-empirical.json").is_file()
    assert json.loads((out / "dense-empirical.json").read_text())["config"]["train"]["epochs"] == 1
    code = main(["distance", "--suite", "mnist5k-dense", "--arch", "mlp", "--out", str(out)])
    assert code == 2 and "takes no --arch" in capsys.readouterr().err
    code = main(["distance", "--suite", "mnist5k-dense", "--epsilon", "2", "--out", str(out)])
    assert code == 2 and "epsilon must lie in (0, 1), got 2.0" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    code = main(["distance", "--suite", "mnist5k-dense", "--threads", "0", "--out", str(fresh)])
    assert code == 2 and "threads must be a positive number" in capsys.readouterr().err
