"""Tiny settings for the pipeline tests: digits tasks, probes trained for two epochs, FUSE
rounds of a few steps over 3-node cells of a two-channel skeleton (a second or so per search)."""

from __future__ import annotations

from fisher_fast.nas import FuseConfig, Skeleton
from fisher_fast.pipeline import DictionarySettings
from fisher_fast.tasks import Task, TrainConfig
from fisher_fast.tasks.suites import digits_suite

TINY_FUSE = FuseConfig(
    candidates=2,
    rounds=2,
    max_steps=6,
    check_every=3,
    batch_size=32,
    weight_lr=0.01,
    alpha_lr=0.1,
    skeleton=Skeleton(channels=2, stages=1),
)
TINY_SETTINGS = DictionarySettings(
    arch="mlp",
    input_shape=(1, 8, 8),
    head_width=10,
    train=TrainConfig(epochs=2, batch_size=64, lr=3e-3),
    fuse=TINY_FUSE,
    nodes=3,
    epsilon=0.9,
)


def digit_tasks() -> tuple[Task, ...]:
    """The digits suite's four tasks (embedded data)."""
    return digits_suite().tasks
