"""Relative-position bias tables given the sample axis where they meet the attention logits.

A table (distances, heads) gathered by a constant index into (1, heads, T, T) and added to the
logits of windows flattened with the samples, (N·W, heads, T, T): traced to that use, expanded
to W rows per sample and verified exact on the planning batch (traced_use.py), else the
per-sample path. Every case is checked against a float64 per-sample loop on data in two
batches: synthetic window attention (elementwise add, a shifted-window mask added first,
``scaled_dot_product_attention``'s mask, a table module whose output its parent adds), Hugging
Face BEiT and Swin; and uses that must keep the per-sample path (a matrix product, windows
laid out window-major, a bias that is part of the model's output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast
from fisher_fast.fim.broadcast_params import PATH

N, C, HEADS, SIDE = 5, 8, 2, 3  # windows of SIDE x SIDE tokens, 2 x 2 windows per sample
T, WINDOWS = SIDE * SIDE, 4
Data = list[tuple[Any, torch.Tensor]]


def _relative_index(side: int) -> torch.Tensor:
    """Swin's (T, T) index of each token pair's offset into a ((2·side - 1)², heads) table."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + side - 1
    return offsets[..., 0] * (2 * side - 1) + offsets[..., 1]


class BiasTable(nn.Module):
    """A table module with no tensor input returning the gathered bias (1, heads, T, T), as
    Hugging Face's ``SwinRelativePositionBias`` and ``BeitRelativePositionBias`` do."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn((2 * SIDE - 1) ** 2, HEADS))
        self.register_buffer("index", _relative_index(SIDE))

    def forward(self) -> torch.Tensor:
        bias = self.table[self.index.view(-1)].view(T, T, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


class WindowAttention(nn.Module):
    """timm Swin's window attention on (N·W, T, C) with its bias table held by itself, or
    (``use="module"``) by a ``BiasTable`` child; ``use`` picks how the bias meets the logits:
    ``add``, ``sdpa`` (the attention mask of scaled_dot_product_attention), ``matmul``."""

    def __init__(self, use: str = "add") -> None:
        super().__init__()
        self.use = use
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        if use == "module":
            self.bias_table = BiasTable()
        else:
            self.table = nn.Parameter(torch.randn((2 * SIDE - 1) ** 2, HEADS))
            self.register_buffer("index", _relative_index(SIDE))

    def bias(self) -> torch.Tensor:
        if self.use == "module":
            return self.bias_table()
        bias = self.table[self.index.view(-1)].view(T, T, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        qkv = self.qkv(x).reshape(rows, T, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.use == "sdpa":  # timm Swin's fused path: the mask (rows, 1, T, T) added first
            bias = self.bias()
            if mask is not None:
                bias = bias + mask.repeat(rows // WINDOWS, 1, 1).unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = q @ k.transpose(-2, -1) * (C // HEADS) ** -0.5
            bias = self.bias()
            logits = logits @ bias if self.use == "matmul" else logits + bias
            if mask is not None:
                logits = logits.view(-1, WINDOWS, HEADS, T, T) + mask[None, :, None]
                logits = logits.view(-1, HEADS, T, T)
            out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(rows, T, -1))


class WindowModel(nn.Module):
    """Tokens (N, 2·SIDE, 2·SIDE, 4) split into 4 windows per sample, window attention, mean.

    ``shifted``: a constant (-100 / 0) mask (W, T, T) added to the logits as well;
    ``window_major``: the windows laid out window after window (W·N rows, samples inner), so
    that axis 0 holds W rows per sample but not as one block per sample;
    ``returns_bias``: the model also returns the bias (its output picks the logits).
    """

    def __init__(
        self,
        use: str = "add",
        shifted: bool = False,
        window_major: bool = False,
        returns_bias: bool = False,
    ) -> None:
        super().__init__()
        self.window_major, self.returns_bias = window_major, returns_bias
        self.embed, self.attn, self.head = nn.Linear(4, C), WindowAttention(use), nn.Linear(C, 3)
        mask = torch.zeros(WINDOWS, T, T)
        mask[1:, : T // 2, T // 2 :] = -100.0
        self.register_buffer("mask", mask if shifted else None)

    def forward(self, x: torch.Tensor) -> Any:
        n = x.shape[0]
        h = self.embed(x).reshape(n, 2, SIDE, 2, SIDE, C)
        order = (1, 3, 0, 2, 4, 5) if self.window_major else (0, 1, 3, 2, 4, 5)
        out = self.attn(h.permute(order).reshape(n * WINDOWS, T, C), self.mask)
        out = out.reshape(WINDOWS, n, T, C).transpose(0, 1) if self.window_major else out
        logits = self.head(out.reshape(n, WINDOWS * T, C).mean(1))
        return (logits, self.attn.bias()) if self.returns_bias else logits


def _data(gen: torch.Generator) -> Data:
    return [
        (
            torch.randn(N - i, 2 * SIDE, 2 * SIDE, 4, generator=gen, dtype=torch.float64),
            torch.randint(3, (N - i,), generator=gen),
        )
        for i in range(2)
    ]


def _exact(model: nn.Module, data: Data, **kwargs: Any) -> dict[str, str]:
    """diag_fim over the batches asserted exact (≤ 1e-10) against the float64 per-sample loop;
    its paths."""
    model = model.double().eval()
    reference = reference_fim_batches(model, data, logits=kwargs.get("output"))
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, **kwargs)
    assert set(fim.names) == set(reference)
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-10, (worst, errors[worst], fim.meta["paths"][worst])
    paths: dict[str, str] = fim.meta["paths"]
    return paths


def _seeded(gen: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))


@pytest.mark.parametrize("use", ["add", "sdpa", "module"])
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_a_table_added_to_window_logits_is_traced(
    use: str, shifted: bool, gen: torch.Generator
) -> None:
    _seeded(gen)
    paths = _exact(WindowModel(use, shifted=shifted), _data(gen))
    table = "attn.bias_table.table" if use == "module" else "attn.table"
    assert paths[table] == PATH, paths
    assert paths["attn.qkv.weight"] == "rule linear_rule"


def test_an_index_as_long_as_the_batch_is_still_an_index(gen: torch.Generator) -> None:
    """A first batch of T² samples: the flattened relative-position index has as many entries
    along its axis 0 as the batch has samples, and is still read as an index, not as the
    samples (Swin V2's last stage: 2 x 2 tokens, 16 samples)."""
    _seeded(gen)
    data = [
        (torch.randn(T * T - i, 2 * SIDE, 2 * SIDE, 4, generator=gen, dtype=torch.float64),
         torch.randint(3, (T * T - i,), generator=gen))
        for i in range(2)
    ]  # fmt: skip
    assert _exact(WindowModel(), data)["attn.table"] == PATH


def test_a_matrix_product_with_the_table_keeps_the_per_sample_path(gen: torch.Generator) -> None:
    _seeded(gen)
    paths = _exact(WindowModel("matmul"), _data(gen))
    assert paths["attn.table"].startswith("per-sample gradients of"), paths


def test_windows_not_in_blocks_per_sample_keep_the_per_sample_path(gen: torch.Generator) -> None:
    """Axis 0 holds W rows per sample, window after window: the expansion's block sums would
    mix samples, so the planning batch's gradient check refuses it."""
    _seeded(gen)
    paths = _exact(WindowModel(window_major=True), _data(gen))
    assert paths["attn.table"].startswith("per-sample gradients of"), paths


def test_a_bias_in_the_models_output_keeps_the_per_sample_path(gen: torch.Generator) -> None:
    _seeded(gen)
    model = WindowModel("module", returns_bias=True)
    paths = _exact(model, _data(gen), output=lambda out: out[0])
    assert paths["attn.bias_table.table"].startswith("per-sample gradients of"), paths


class PaddedBiasAttention(nn.Module):
    """Attention over tokens (N, T, C) whose bias (1, heads, T, T) is masked per sample before it
    meets the logits (a token with a negative first feature is padding), as Hugging Face's T5
    does: ``torch.where(mask, bias, min)`` or ``bias.masked_fill(~mask, min)``."""

    def __init__(self, select: str) -> None:
        super().__init__()
        self.select = select
        self.qkv, self.head = nn.Linear(C, 3 * C), nn.Linear(C, 3)
        self.table = nn.Parameter(torch.randn((2 * SIDE - 1) ** 2, HEADS))
        self.register_buffer("index", _relative_index(SIDE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, T, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(T, T, -1).permute(2, 0, 1).unsqueeze(0)
        keep = (x[..., 0] > 0)[:, None, None, :]  # (N, 1, 1, T): a padding mask per sample
        low = torch.finfo(x.dtype).min
        if self.select == "where":
            masked = torch.where(keep, bias, low)
        else:
            masked = bias.masked_fill(~keep, low)
        logits = q @ k.transpose(-2, -1) * (C // HEADS) ** -0.5 + masked
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, T, C)
        return self.head(out.mean(1))


@pytest.mark.parametrize("select", ["where", "masked_fill"])
def test_a_table_masked_per_sample_is_traced(select: str, gen: torch.Generator) -> None:
    _seeded(gen)
    data = [
        (torch.randn(N, T, C, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,)))
        for _ in range(2)
    ]
    for x, _ in data:
        x[:, 0, 0] = x[:, 0, 0].abs() + 0.1  # every sample keeps at least one token
    paths = _exact(PaddedBiasAttention(select), data)
    assert paths["table"] == PATH, paths


# -- Hugging Face transformers -------------------------------------------------------------------
def _hf() -> Any:
    return pytest.importorskip("transformers")


def _beit(attention: str, shared: bool) -> nn.Module:
    tf = _hf()
    config = tf.BeitConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared, use_absolute_position_embeddings=False,
        num_labels=3, attn_implementation=attention,
    )  # fmt: skip
    return tf.BeitForImageClassification(config)


def _swin(version: str = "") -> nn.Module:
    """Hugging Face Swin (``version`` "") or Swin V2 ("v2") from a small config."""
    tf = _hf()
    config = getattr(tf, f"Swin{version}Config")(
        image_size=16, patch_size=2, window_size=2, embed_dim=8, depths=[2, 1],
        num_heads=[1, 2], num_labels=3,
    )  # fmt: skip
    return getattr(tf, f"Swin{version}ForImageClassification")(config)


_BEIT_TABLES = [
    f"beit.layers.{i}.relative_position_bias.relative_position_bias_table" for i in (0, 1)
]
HF_MODELS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "beit_eager": (
        lambda: _beit("eager", shared=False),
        _BEIT_TABLES,
    ),
    "beit_sdpa": (
        lambda: _beit("sdpa", shared=False),
        _BEIT_TABLES,
    ),
    "beit_shared": (
        lambda: _beit("eager", shared=True),
        ["beit.shared_position_bias.relative_position_bias_table"],
    ),
    "swin": (
        _swin,
        [
            f"swin.encoder.layers.0.blocks.{i}.attention.relative_position_bias"
            ".relative_position_bias_table"
            for i in (0, 1)  # block 1: shifted windows, with the mask
        ],
    ),
    "swinv2": (  # a position-bias MLP run on a constant table; the logit scale
        lambda: _swin("v2"),  # one head in stage 0: a logit scale (1, 1, 1), traced
        [
            f"swinv2.encoder.layers.0.blocks.{i}.attention.self.{p}"
            for i in (0, 1)
            for p in (
                "continuous_position_bias_mlp.0.weight",
                "continuous_position_bias_mlp.0.bias",
                "continuous_position_bias_mlp.2.weight",
                "logit_scale",
            )
        ],
    ),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hugging_face_tables_are_traced_and_exact(name: str, gen: torch.Generator) -> None:
    _seeded(gen)
    factory, tables = HF_MODELS[name]
    data = [
        (torch.randn(N - i, 3, 16, 16, generator=gen, dtype=torch.float64),
         torch.randint(3, (N - i,), generator=gen))
        for i in range(2)
    ]  # fmt: skip
    paths = _exact(factory(), data)
    for table in tables:
        assert paths[table] == PATH, (table, paths[table])
