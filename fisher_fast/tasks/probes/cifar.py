"""CIFAR-style VGG-16, ResNet-18 and DenseNet-121: the paper's three ε-approximation networks.

The 32x32 variants used for CIFAR (3x3 stem, no initial max-pool, batch norm throughout), written
here so that torchvision is not needed. They end in global average pooling, so they also run on
28x28 MNIST and on other image sizes (at least 8x8). Parameter counts with a 10-way head:
VGG-16 14.7 M, ResNet-18 11.2 M, DenseNet-121 7.0 M.
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.tasks.probes.small import BasicBlock, image_channels

VGG16_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16(nn.Module):
    """Thirteen 3x3 convolutions with batch norm, five 2x2 max-pools, a linear head."""

    def __init__(self, input_shape: tuple[int, ...], head_width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = image_channels(input_shape, "vgg16")
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, head_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class ResNet18(nn.Module):
    """3x3 stem (64), four stages of two basic blocks (64, 128, 256, 512; strides 1, 2, 2, 2)."""

    def __init__(self, input_shape: tuple[int, ...], head_width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(image_channels(input_shape, "resnet18"), 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, head_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k) -> BN-ReLU-conv3x3 (k), output concatenated to the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet121(nn.Module):
    """Growth rate 32, dense blocks of 6, 12, 24, 16 layers, transitions halving the channels
    and the resolution (2x2 average pool)."""

    def __init__(self, input_shape: tuple[int, ...], head_width: int, growth: int = 32) -> None:
        super().__init__()
        channels = 2 * growth
        layers: list[nn.Module] = [
            nn.Conv2d(
                image_channels(input_shape, "densenet121"), channels, 3, padding=1, bias=False
            )
        ]
        for i, depth in enumerate((6, 12, 24, 16)):
            for _ in range(depth):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if i < 3:
                layers += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.Conv2d(channels, channels // 2, 1, bias=False),
                    nn.AvgPool2d(2, ceil_mode=True),
                ]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, head_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
