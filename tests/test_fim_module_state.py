"""A model that keeps a tensor with autograd history on a module between calls (timm LeViT's,
EfficientFormer's, EfficientViT's and TinyViT's eval-mode attention-bias cache) is refused with
an error naming where, never answered with zeros; with the cache off, the result is exact."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import fisher_fast

N, T, C = 5, 4, 6


class CachedBiasAttention(nn.Module):
    """Attention over (N, T, C) whose bias (T, T) is gathered from a parameter, and kept in a
    dict in eval mode, as timm's LeViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.attention_biases = nn.Parameter(torch.randn(2 * T - 1))
        offsets = torch.arange(T)[:, None] - torch.arange(T)[None, :] + T - 1
        self.register_buffer("idxs", offsets)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def biases(self) -> torch.Tensor:
        if self.training:
            return self.attention_biases[self.idxs]
        if "cpu" not in self.attention_bias_cache:
            self.attention_bias_cache["cpu"] = self.attention_biases[self.idxs]
        return self.attention_bias_cache["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        logits = q @ k.transpose(1, 2) * C**-0.5 + self.biases()
        return self.proj(logits.softmax(-1) @ v)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(3, C), CachedBiasAttention(), nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.attn(self.embed(x))).mean(1))


def _problem() -> tuple[Model, torch.Tensor, torch.Tensor]:
    torch.manual_seed(random.randrange(2**31))
    x = torch.randn(N, T, 3, dtype=torch.float64)
    return Model().double().eval(), x, torch.randint(0, 3, (N,))


def test_a_cache_filled_by_the_forward_is_refused() -> None:
    model, x, y = _problem()
    with pytest.raises(ValueError, match=r"attn\.attention_bias_cache.*training = True"):
        fisher_fast.diag_fim(model, (x, y), progress=False)


def test_a_cache_left_by_an_earlier_forward_is_refused() -> None:
    model, x, y = _problem()
    model(x)  # the user's own eval-mode forward, with grad
    with pytest.raises(ValueError, match=r"attn\.attention_bias_cache"):
        fisher_fast.diag_fim(model, (x, y), progress=False, max_samples=2)


def test_with_the_cache_off_the_result_is_exact() -> None:
    """The error's advice: the caching module alone in training mode, mode='keep'."""
    model, x, y = _problem()
    model.attn.training = True
    fim = fisher_fast.diag_fim(
        model, (x, y), progress=False, dtype=torch.float64, mode="keep", batch_size=3
    )
    params = [p for _, p in model.named_parameters()]
    reference = torch.zeros_like(fim.flat)
    for i in range(N):  # a float64 per-sample loop on the model as it is (the flag kept)
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        reference += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]) ** 2
    reference /= N
    assert fim.names == [name for name, _ in model.named_parameters()]
    assert float((fim.flat - reference).abs().max()) <= 1e-10 * float(reference.abs().max())
    assert float(fim["attn.attention_biases"].abs().max()) > 0


def test_a_cache_filled_by_a_failed_attempt_is_refused_by_name() -> None:
    """Hugging Face's LeViT with one head: its (1, points) attention biases, expanded whole as a
    class token would be, break its attention, and the failed pass leaves the expanded biases
    in ``attention_bias_cache``, where every later attempt would read them: refused by name,
    not the model's own shape error."""
    tf = pytest.importorskip("transformers")
    config = tf.LevitConfig(
        image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16, num_labels=3,
    )  # fmt: skip
    model = tf.LevitForImageClassification(config).eval()
    data = ({"pixel_values": torch.randn(5, 3, 32, 32)}, torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match=r"attention_bias_cache.*training = True"):
        fisher_fast.diag_fim(model, [data], progress=False)
