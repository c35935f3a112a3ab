"""Small CPU-friendly probe families for small images (8x8 digits, 28x28 MNIST, any size).

Three different families, so that the paper's claim that the ordering of task distances does
not depend on the ε-approximation network can be checked on a laptop: a multilayer perceptron,
a plain convolutional network and a residual network with batch normalisation. The convolutional
ones end in adaptive pooling, so one definition serves every input size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten -> 128 -> 64 -> head, ReLU between (input (N, *input_shape))."""

    def __init__(self, input_shape: tuple[int, ...], head_width: int) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, head_width),
        )


class SmallCNN(nn.Sequential):
    """conv 3x3 (16) -> max-pool 2 -> conv 3x3 (32) -> adaptive average pool 2x2 -> 64 -> head."""

    def __init__(self, input_shape: tuple[int, ...], head_width: int) -> None:
        channels = image_channels(input_shape, "cnn")
        super().__init__(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, head_width),
        )


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18/34 (He et al.), with batch norm and a
    1x1 projection shortcut when the shape changes. Shared by the small and the CIFAR ResNet."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Sequential):
    """stem conv 3x3 (16) + BN -> residual block (16) -> residual block (32, stride 2) ->
    global average pool -> head."""

    def __init__(self, input_shape: tuple[int, ...], head_width: int) -> None:
        channels = image_channels(input_shape, "resnet")
        super().__init__(
            nn.Conv2d(channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, head_width),
        )


def image_channels(input_shape: tuple[int, ...], arch: str) -> int:
    """C of an image shape (C, H, W); a clear error for other shapes."""
    if len(input_shape) != 3:
        raise ValueError(
            f"probe {arch!r} takes images (C, H, W); the task's inputs have shape {input_shape}"
        )
    return int(input_shape[0])
