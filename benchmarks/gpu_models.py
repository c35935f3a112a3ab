"""The GPU check's end-to-end models, in plain torch.nn (the GPU machine has no network and
need not have timm, torchvision or transformers): ResNet-18 and ResNet-50, a ViT-B/16 with a
class token and position embeddings added in its forward, and a GPT-2-small-like causal
decoder whose position ids of shape (1, T) are broadcast and whose head is tied to the token
embedding; and GPT-2's single layers, each alone (:func:`gpt2_layer`): a Linear, the transposed
Linear of Hugging Face's GPT-2 (``Conv1D``), causal self-attention and the tied head. Each
builder takes its sizes, so the tests and ``gpu_check.py --smoke`` build the same code small on
a CPU.
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


class Conv1D(nn.Module):
    """Hugging Face GPT-2's transposed Linear, y = x W + b with W of shape (in, out), written
    out here (the GPU machine has no transformers). fisher_fast recognises the original by its
    class name, its module and ``nf`` (fisher_fast/fim/rules/transposed_linear.py), so this one
    says it comes from transformers and takes the same rule."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.nf
        )


Conv1D.__module__ = "transformers.pytorch_utils"


class CausalSelfAttention(nn.Module):
    """nn.MultiheadAttention over (N, T, D) with a causal mask and no attention weights
    returned, as in nn.TransformerEncoderLayer (the rule's instrumented path)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        return self.attention(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]


class TiedHead(nn.Module):
    """Token ids (N, T) -> logits (N, T, V): the token embedding, a LayerNorm and the language
    model head tied to the embedding, GPT-2's two ends without the layers between."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.tokens(ids)))


GPT2_LAYER_PATHS = ("linear", "conv1d", "attention", "tied")
"""The kinds of :func:`gpt2_layer`: nn.Linear, the transposed Linear (Conv1D), causal
self-attention (nn.MultiheadAttention) and the head tied to the token embedding."""


def gpt2_layer(path: str, width: int, size: int) -> nn.Module:
    """One GPT-2 layer alone, taking (N, T, ``width``) activations (token ids for ``tied``):
    ``linear`` and ``conv1d`` map ``width`` to ``size`` features, ``attention`` has ``size``
    heads (output ``width``), ``tied`` has a vocabulary of ``size``."""
    if path == "linear":
        return nn.Linear(width, size)
    if path == "conv1d":
        return Conv1D(size, width)
    if path == "attention":
        return CausalSelfAttention(width, size)
    if path == "tied":
        return TiedHead(size, width)
    raise ValueError(f"no GPT-2 layer {path!r}; one of {', '.join(GPT2_LAYER_PATHS)}")


def gpt2_layer_batch(
    path: str, width: int, size: int, n: int, positions: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of ``positions`` inputs for :func:`gpt2_layer` and a target class per output
    position (for :func:`per_sample_losses.lm_loss`), on the CPU."""
    classes = width if path == "attention" else size
    if path == "tied":
        x = torch.randint(0, size, (n, positions), generator=gen)
    else:
        x = torch.randn(n, positions, width, generator=gen)
    return x, torch.randint(0, classes, (n, positions), generator=gen)


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


def small_workloads() -> dict[str, Workload]:
    """The same models a few hundred times smaller, for ``gpu_check.py --smoke`` on a CPU."""
    return {
        "CIFAR ResNet-18 (small)": Workload(
            lambda: resnet(18, 10, width=4, cifar=True), images(8, 10), 8, class_loss
        ),
        "ResNet-50 (small)": Workload(
            lambda: resnet(50, 10, width=4), images(32, 10), 4, class_loss
        ),
        "ViT (small)": Workload(
            lambda: ViT(image=16, patch=8, dim=16, depth=2, heads=2, classes=10),
            images(16, 10),
            4,
            class_loss,
        ),
        "GPT-2 (small)": Workload(
            lambda: GPT2Like(vocab=97, context=16, dim=16, depth=2, heads=2),
            token_ids(97, 16),
            4,
            lm_loss,
        ),
    }
