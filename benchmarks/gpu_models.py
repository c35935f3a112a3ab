"""The GPU check's end-to-end models, in plain torch.nn (the GPU machine has no network and
need not have timm, torchvision or transformers): ResNet-18 and ResNet-50, a ViT-B/16 with a
class token and position embeddings added in its forward, and a GPT-2-small-like causal
decoder whose position ids of shape (1, T) are broadcast and whose head is tied to the token
embedding. Each builder takes its sizes, so the tests build the same code small on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from per_sample_losses import class_loss, lm_loss  # beside this file
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convolutions with BatchNorm and a shortcut (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def resnet(depth: int, classes: int = 1000, width: int = 64, cifar: bool = False) -> nn.Module:
    """ResNet-18 or -50 (``depth``); ``cifar``: a 3x3 stem without max-pooling, for 32x32
    images; ``width``: the first stage's width (64 in the papers)."""
    block, counts = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]
    stem: list[nn.Module] = (
        [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if cifar
        else [
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
    )
    layers, cin = stem, width
    for stage, count in enumerate(counts):
        for i in range(count):
            layers.append(block(cin, width << stage, 2 if i == 0 and stage > 0 else 1))
            cin = (width << stage) * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class ViT(nn.Module):
    """ViT with a class token and learned position embeddings added in forward (broadcast over
    the samples), pre-norm encoder layers; ViT-B/16 is the default."""

    def __init__(
        self,
        image: int = 224,
        patch: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        classes: int = 1000,
    ) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patches(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


class GPT2Like(nn.Module):
    """A causal decoder like GPT-2 small by default: token and position embeddings (position
    ids (1, T), broadcast over the samples), pre-norm layers, a final LayerNorm and a language
    model head tied to the token embedding."""

    def __init__(
        self,
        vocab: int = 50257,
        context: int = 512,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        where = torch.arange(t, device=ids.device)[None]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.decoder(self.tokens(ids) + self.positions(where), mask=mask, is_causal=True)
        return self.head(self.norm(h))


@dataclass(frozen=True)
class Workload:
    """A model and how to draw a batch of ``n`` samples for it on a device."""

    build: Callable[[], nn.Module]
    batch: Callable[[int, str, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    n: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def images(side: int, classes: int) -> Callable[[int, str, torch.Generator], tuple]:
    """Batches of n random images (n, 3, side, side) with labels in [0, classes)."""

    def draw(n: int, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, side, side, generator=gen)
        return x.to(device), torch.randint(0, classes, (n,), generator=gen).to(device)

    return draw


def token_ids(vocab: int, context: int) -> Callable[[int, str, torch.Generator], tuple]:
    """Batches of n random sequences of ``context`` token ids, the targets their next ids."""

    def draw(n: int, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (n, context + 1), generator=gen)
        return ids[:, :-1].to(device), ids[:, 1:].to(device)

    return draw


def issue_workloads() -> dict[str, Workload]:
    """The GPU check's models at the sizes the GPU issue names."""
    return {
        "CIFAR ResNet-18 N=256 32px": Workload(
            lambda: resnet(18, 10, cifar=True), images(32, 10), 256, class_loss
        ),
        "ResNet-18 224px N=64": Workload(lambda: resnet(18), images(224, 1000), 64, class_loss),
        "ResNet-50 224px N=32": Workload(lambda: resnet(50), images(224, 1000), 32, class_loss),
        "ViT-B/16 224px N=32": Workload(lambda: ViT(), images(224, 1000), 32, class_loss),
        "GPT-2 small T=512 N=8": Workload(lambda: GPT2Like(), token_ids(50257, 512), 8, lm_loss),
    }
