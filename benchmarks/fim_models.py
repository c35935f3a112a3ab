"""The four benchmark problems for the diagonal Fisher: MLP, CNN, ResNet-18 and a Transformer layer.

Each problem is a seeded function returning ``(model in eval mode, inputs, targets)`` with random
data, so every method in `fim_baselines` sees exactly the same network and batch. The sizes below
are the benchmark configuration; tests and ``--quick`` runs ask for fewer samples and, with
``small=True``, smaller images and sequences.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
SEED = 0
NUM_CLASSES = 10

MLP_WIDTHS = (784, 512, 512, NUM_CLASSES)
MLP_N = 512

CNN_CHANNELS = (32, 64, 128)
CNN_IMAGE = (3, 32, 32)
CNN_N = 256

RESNET_BLOCKS = (2, 2, 2, 2)
RESNET_WIDTHS = (64, 128, 256, 512)
RESNET_IMAGE = (3, 32, 32)
RESNET_N = 64

TRANSFORMER_VOCAB = 1000
TRANSFORMER_DIM = 256
TRANSFORMER_HEADS = 4
TRANSFORMER_T = 128
TRANSFORMER_N = 64

QUICK_N = 8  # samples per problem in smoke runs (with the `SMALL_INPUTS` sizes)


class Problem(NamedTuple):
    """A model in eval mode and one batch of inputs with integer class targets."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    """Fully connected ReLU network with the widths of ``MLP_WIDTHS``."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(MLP_WIDTHS)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """Three 3×3 conv layers (max-pool after the first two), global average pool, linear head."""
    c1, c2, c3 = CNN_CHANNELS
    return nn.Sequential(
        nn.Conv2d(CNN_IMAGE[0], c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, NUM_CLASSES),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv + BatchNorm, identity or 1×1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3×3 stem without max-pool, four stages of basic blocks."""

    def __init__(self) -> None:
        super().__init__()
        width = RESNET_WIDTHS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(RESNET_IMAGE[0], width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages = []
        for i, (blocks, out_width) in enumerate(zip(RESNET_BLOCKS, RESNET_WIDTHS, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(width, out_width, stride if b == 0 else 1))
                width = out_width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


class TransformerClassifier(nn.Module):
    """Token embedding, one post-norm Transformer encoder layer, mean pool over T, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(TRANSFORMER_VOCAB, TRANSFORMER_DIM)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=TRANSFORMER_DIM, nhead=TRANSFORMER_HEADS, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(TRANSFORMER_DIM, NUM_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(dim=1))


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial running statistics and affine parameters.

    Fresh BatchNorm layers in eval mode are the identity, which would hide a method that ignores
    them; a trained network has statistics away from (0, 1).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(1.0 + 0.1 * torch.randn(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------
def _image_batch(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn((n, *shape), generator=generator)


def _targets(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def _build(
    make_model: Callable[[], nn.Module],
    make_inputs: Callable[[int, torch.Generator], torch.Tensor],
    n: int,
    seed: int,
) -> Problem:
    """Seed, build the model in eval mode and draw one batch of ``n`` inputs and targets."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_model()
    with torch.no_grad():
        _randomize_batchnorm(model, generator)
    inputs = make_inputs(n, generator)
    return Problem(model.eval(), inputs, _targets(n, generator))


def mlp_problem(n: int = MLP_N, seed: int = SEED) -> Problem:
    """MLP 784-512-512-10 on ``n`` flattened 28×28 inputs."""
    return _build(mlp, lambda k, g: _image_batch(k, (MLP_WIDTHS[0],), g), n, seed)


def cnn_problem(
    n: int = CNN_N, seed: int = SEED, image: tuple[int, int, int] = CNN_IMAGE
) -> Problem:
    """Small CNN on ``n`` images of shape ``image`` (3×32×32)."""
    return _build(cnn, lambda k, g: _image_batch(k, image, g), n, seed)


def resnet18_problem(
    n: int = RESNET_N, seed: int = SEED, image: tuple[int, int, int] = RESNET_IMAGE
) -> Problem:
    """CIFAR ResNet-18 (BatchNorm in eval mode) on ``n`` images of shape ``image`` (3×32×32)."""
    return _build(ResNet18, lambda k, g: _image_batch(k, image, g), n, seed)


def transformer_problem(
    n: int = TRANSFORMER_N, seed: int = SEED, seq_len: int = TRANSFORMER_T
) -> Problem:
    """One Transformer encoder layer classifier on ``n`` token sequences of length ``seq_len``."""

    def tokens(k: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, TRANSFORMER_VOCAB, (k, seq_len), generator=g)

    return _build(TransformerClassifier, tokens, n, seed)


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "resnet18": resnet18_problem,
    "transformer": transformer_problem,
}

# Smaller inputs for tests and smoke runs: the same architectures and parameters, less compute
# per sample (float64 convolutions on CPU are slow).
SMALL_INPUTS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "cnn": {"image": (3, 8, 8)},
    "resnet18": {"image": (3, 8, 8)},
    "transformer": {"seq_len": 8},
}


def make_problem(name: str, n: int | None = None, seed: int = SEED, small: bool = False) -> Problem:
    """Build problem ``name`` with its configured size, or ``n`` samples / `SMALL_INPUTS`."""
    kwargs: dict[str, Any] = {"seed": seed, **(SMALL_INPUTS[name] if small else {})}
    if n is not None:
        kwargs["n"] = n
    return PROBLEMS[name](**kwargs)
