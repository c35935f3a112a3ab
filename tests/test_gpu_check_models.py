"""The GPU check's end-to-end models (benchmarks/gpu_models.py, plain torch.nn), built small on
the CPU: diag_fim on each matches a float64 per-sample loop, so that the one GPU run times
correct computations, and the paths it takes are the fast ones (no per-sample fallback)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_models
import per_sample_losses

SMALL = {
    "resnet18 cifar": (lambda: gpu_models.resnet(18, 5, width=4, cifar=True), "images", 8),
    "resnet50": (lambda: gpu_models.resnet(50, 5, width=4), "images", 32),
    "vit": (
        lambda: gpu_models.ViT(image=16, patch=8, dim=16, depth=2, heads=2, classes=5),
        "images",
        16,
    ),
    "gpt2": (
        lambda: gpu_models.GPT2Like(vocab=23, context=6, dim=16, depth=2, heads=2),
        "tokens",
        6,
    ),
}


def _batches(kind: str, side: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    draw = gpu_models.images(side, 5) if kind == "images" else gpu_models.token_ids(23, side)
    return [draw(3, "cpu", gen) for _ in range(2)]


@pytest.mark.parametrize("name", list(SMALL))
def test_gpu_check_models_match_the_per_sample_loop(name: str, gen: torch.Generator) -> None:
    build, kind, side = SMALL[name]
    torch.manual_seed(random.randrange(2**31))
    model = build().double().eval()
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    data = [(x.double() if x.is_floating_point() else x, y) for x, y in _batches(kind, side, gen)]
    loss = {"loss": per_sample_losses.lm_loss} if kind == "tokens" else {}
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, **loss)
    reference = reference_fim_batches(model, data)
    assert set(fim.names) == set(reference)
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-10, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"
    slow = {n: p for n, p in fim.meta["paths"].items() if "per-sample" in p or "fallback" in p}
    assert not slow, slow


def test_the_issue_sizes_are_the_named_models() -> None:
    """The workloads are the GPU issue's models, by parameter count (ResNet-18 11.7 M,
    ResNet-50 25.6 M, ViT-B/16 86.6 M, GPT-2 small 124.4 M with its tied head)."""
    want = {
        "ResNet-18 224px N=64": 11.69e6,
        "ResNet-50 224px N=32": 25.56e6,
        "ViT-B/16 224px N=32": 86.57e6,
        "GPT-2 small T=512 N=8": 124.0e6,
    }
    workloads = gpu_models.issue_workloads()
    for name, count in want.items():
        params = sum(p.numel() for p in workloads[name].build().parameters())
        assert abs(params - count) / count < 0.01, (name, params)
