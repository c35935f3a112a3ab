"""ε-approximation probes (paper Definition 2): the networks whose FIMs define task distances.

Every probe of one comparison has the same architecture (Definition 3), including one head
width for the whole suite: task label k is predicted by head unit k, and the head has as many
units as the largest task of the suite has classes. Units a task does not use are trained
towards low scores by the cross-entropy over the whole head, and kept in the FIM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fisher_fast.tasks.probes.cifar import VGG16, DenseNet121, ResNet18
from fisher_fast.tasks.probes.small import MLP, SmallCNN, SmallResNet

ProbeFactory = Callable[[tuple[int, ...], int], nn.Module]

SMALL_PROBES: dict[str, ProbeFactory] = {"mlp": MLP, "cnn": SmallCNN, "resnet": SmallResNet}
"""Families for small images, fast on a CPU."""
CIFAR_PROBES: dict[str, ProbeFactory] = {
    "vgg16": VGG16,
    "resnet18": ResNet18,
    "densenet121": DenseNet121,
}
"""The paper's networks, in their CIFAR (32x32) form."""
PROBES: dict[str, ProbeFactory] = {**SMALL_PROBES, **CIFAR_PROBES}


def make_probe(
    arch: str, input_shape: tuple[int, ...], head_width: int, *, seed: int | None = None
) -> nn.Module:
    """A fresh probe ``arch`` for inputs of shape ``input_shape`` (without the batch axis) and
    ``head_width`` outputs (logits). With ``seed``, the initialisation is drawn from that seed
    without touching the global random state."""
    if arch not in PROBES:
        raise ValueError(f"unknown probe architecture {arch!r}; choose one of {', '.join(PROBES)}")
    if head_width < 2:
        raise ValueError(f"head_width must be at least 2, got {head_width}")
    if seed is None:
        return PROBES[arch](tuple(input_shape), head_width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PROBES[arch](tuple(input_shape), head_width)


__all__ = ["CIFAR_PROBES", "PROBES", "SMALL_PROBES", "make_probe"]
