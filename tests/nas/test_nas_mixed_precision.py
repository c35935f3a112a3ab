"""Automatic mixed precision of the training loops (fisher_fast.mixed_precision): the setting is
checked, recorded only when not fp32, and really changes the training forward passes (bf16 and
fp16 autocast on the CPU), with the fp16 scaler skipping steps whose gradients overflow; and
the SyncBatchNorm conversion of the data-parallel searches on GPUs."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import pytest
import torch
from nas_search_helpers import SHAPE, THREE_OPS, TINY, toy_part
from torch import nn

from fisher_fast.commands import common
from fisher_fast.mixed_precision import MixedPrecision
from fisher_fast.nas import FuseConfig, fuse_search
from fisher_fast.nas.genotype import Genotype
from fisher_fast.nas.parallel import with_sync_batchnorm
from fisher_fast.nas.random_search import random_search
from fisher_fast.nas.training import train_steps
from fisher_fast.tasks import Part
from fisher_fast.tasks.train import TrainConfig, fit


class DtypeLog:
    """Forward hooks on every Linear and Conv2d of a model, logging the dtype of each output
    in training mode."""

    def __init__(self, model: nn.Module) -> None:
        self.dtypes: set[torch.dtype] = set()
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.register_forward_hook(self._log)

    def _log(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if module.training:
            self.dtypes.add(output.dtype)


def mlp(genotype: Genotype | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))


def trained_mlp(precision: str) -> tuple[nn.Module, DtypeLog]:
    model = mlp()
    log = DtypeLog(model)
    data = toy_part(48, seed=3)
    batches = iter([Part(data.x[i : i + 16], data.y[i : i + 16]) for i in range(0, 48, 16)] * 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, batches, 12, optimizer, precision)
    return model, log


@pytest.mark.parametrize("bad", ["fp8", "float16", "", "BF16"])
def test_an_unknown_precision_is_refused_by_every_config(bad: str) -> None:
    for make in (lambda: FuseConfig(precision=bad), lambda: TrainConfig(precision=bad)):
        with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, fp16, got"):
            make()
    with pytest.raises(ValueError, match="precision must be one of"):
        MixedPrecision(bad, "cpu")


def test_fp32_is_left_out_of_recorded_settings_and_others_round_trip() -> None:
    assert "precision" not in FuseConfig().to_dict()
    assert "precision" not in TrainConfig().to_dict()
    fuse = FuseConfig(precision="bf16")
    assert fuse.to_dict()["precision"] == "bf16"
    assert FuseConfig.from_dict(fuse.to_dict()) == fuse
    assert FuseConfig.from_dict(FuseConfig().to_dict()) == FuseConfig()
    train = TrainConfig(precision="fp16")
    assert TrainConfig(**train.to_dict()) == train


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_training_forward_passes_run_in_the_chosen_dtype(
    precision: str, dtype: torch.dtype
) -> None:
    reference, plain = trained_mlp("fp32")
    model, log = trained_mlp(precision)
    assert plain.dtypes == {torch.float32}
    assert log.dtypes == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 weights
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert not torch.equal(got, want)  # the rounding of the low precision shows
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.05)  # and no more than rounding


def test_fp16_scaler_skips_a_step_whose_gradients_overflow() -> None:
    model = nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = MixedPrecision("fp16", "cpu")
    scale = amp.scaler.get_scale()
    with amp.forward():
        loss = model(torch.full((2, 4), 1e5)).float().pow(8).sum()  # inf gradients
    amp.backward(loss)
    amp.step(optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert amp.scaler.get_scale() < scale
    optimizer.zero_grad()
    with amp.forward():
        loss = model(torch.full((1, 4), 0.01)).sum()  # small gradients: finite once scaled
    amp.backward(loss)
    amp.step(optimizer)
    assert not torch.equal(model.weight, before[0])  # a finite step is taken
    torch.testing.assert_close(model.weight, before[0] - 0.1 * 0.01, rtol=0, atol=1e-5)


def test_probe_training_uses_the_train_config_precision() -> None:
    data = toy_part(48, seed=3)
    logs = {}
    for precision in ("fp32", "bf16"):
        model = mlp()
        logs[precision] = DtypeLog(model)
        config = TrainConfig(epochs=2, batch_size=16, precision=precision, keep_best=False)
        fit(model, config, data.x, data.y, nn.functional.cross_entropy, seed=0, device="cpu")
    assert logs["fp32"].dtypes == {torch.float32}
    assert logs["bf16"].dtypes == {torch.bfloat16}


def test_both_searches_train_at_the_config_precision() -> None:
    config = replace(TINY, candidates=2, rounds=1, max_steps=8, check_every=4, precision="bf16")
    models: list[nn.Module] = []
    logs: list[DtypeLog] = []

    def build(genotype: Genotype) -> nn.Module:
        model = config.skeleton.builder(SHAPE, 2)(genotype)
        models.append(model)
        logs.append(DtypeLog(model))
        return model

    for run in (fuse_search, random_search):
        models.clear()
        logs.clear()
        extra = {"budget": 16} if run is random_search else {}
        run(
            THREE_OPS,
            toy_part(48, seed=3),
            num_classes=2,
            generator=torch.Generator().manual_seed(1),
            config=config,
            build=build,
            **extra,
        )
        assert models, run.__name__
        assert set().union(*(log.dtypes for log in logs)) == {torch.bfloat16}, run.__name__


def test_the_cli_option_reaches_the_fuse_config() -> None:
    parser = argparse.ArgumentParser()
    common.add_fuse_arguments(parser)
    args = parser.parse_args(["--precision", "bf16", "--rounds", "3"])
    config = common.fuse_settings(args, FuseConfig())
    assert (config.precision, config.rounds) == ("bf16", 3)
    assert common.fuse_settings(parser.parse_args([]), FuseConfig()) == FuseConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])


def test_sync_batchnorm_conversion_keeps_the_model_and_its_tensors() -> None:
    """What data_parallel does to a model on GPUs (SyncBatchNorm needs a process group on CUDA
    to run, but not to be built): every BatchNorm at any depth replaced, the same parameter and
    buffer tensors held, the root module the same object."""
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))
    )
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert with_sync_batchnorm(model) is model
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == tensors.keys()
    assert all(after[k] is tensors[k] for k in tensors)
