"""diag_fim on models as users bring them, against a float64 per-sample autograd loop.

Hugging Face transformers models built from small configs (random weights, no downloads),
torch.nn's Transformer and recurrent layers in both layouts, attention with ``add_bias_kv``,
broadcast position ids, tied weights. Each runs on data in two batches, in float64 (error
≤ 1e-10) and float32 (≤ 1e-5). transformers is an optional test dependency: its tests are
skipped without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from call_counter import CallCounter
from fim_reference import (
    float32_bound,
    max_relative_error,
    reference_fim,
    reference_fim_batches,
    relative_error,
)
from torch import nn

import fisher_fast
from fisher_fast.fim import engine
from fisher_fast.fim.check import CheckFailedWarning, ReferencePrecisionWarning
from fisher_fast.fim.fallback import PerSampleLoopWarning

VOCAB, T, N = 40, 6, 5
Problem = tuple[nn.Module, list[tuple[Any, torch.Tensor]], dict[str, Any]]


def _lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample language-model loss: cross-entropy summed over the positions."""
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def _tokens(low: int = 0) -> torch.Tensor:
    return torch.randint(low, VOCAB, (N, T))


def _classes(k: int = 3) -> torch.Tensor:
    return torch.randint(0, k, (N,))


# -- Hugging Face transformers -------------------------------------------------------------------
def _hf() -> Any:
    return pytest.importorskip("transformers")


def bert() -> Problem:
    tf = _hf()
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    data = [({"input_ids": _tokens()}, _classes()) for _ in range(2)]
    return tf.BertForSequenceClassification(cfg), data, {}


def gpt2_tied_head() -> Problem:
    tf = _hf()
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    model = tf.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # the head is tied
    data = [({"input_ids": _tokens()}, _tokens()) for _ in range(2)]
    return model, data, {"loss": _lm_loss}


def llama() -> Problem:
    tf = _hf()
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=24, max_position_embeddings=16, num_labels=3,
        pad_token_id=0,
    )  # fmt: skip
    data = [({"input_ids": _tokens(low=1)}, _classes()) for _ in range(2)]
    return tf.LlamaForSequenceClassification(cfg), data, {}


def gemma() -> Problem:
    """Gemma's scaled token embedding (rows times sqrt(hidden)) tied to its head, padding_idx 0,
    and its (1 + weight) norms."""
    tf = _hf()
    cfg = tf.GemmaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    model = tf.GemmaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, [({"input_ids": _tokens()}, _tokens()) for _ in range(2)], {"loss": _lm_loss}


def vit() -> Problem:
    tf = _hf()
    cfg = tf.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, num_labels=3,
    )  # fmt: skip
    data = [({"pixel_values": torch.randn(N, 3, 8, 8)}, _classes()) for _ in range(2)]
    return tf.ViTForImageClassification(cfg), data, {}


def mpnet() -> Problem:
    """MPNet: a relative-position bias looked up by a bucket table, expanded to the batch and
    copied, then added to every layer's logits in place."""
    tf = _hf()
    cfg = tf.MPNetConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3, pad_token_id=1,
    )  # fmt: skip
    model = tf.MPNetForSequenceClassification(cfg)
    data = [({"input_ids": _tokens(low=2)}, _classes()) for _ in range(2)]
    return model, data, {}


class _PooledClassifier(nn.Module):
    """A vision tower (Hugging Face ``*VisionModel``) with a Linear on its pooled output."""

    def __init__(self, tower: nn.Module, width: int) -> None:
        super().__init__()
        self.tower, self.head = tower, nn.Linear(width, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=pixel_values).pooler_output)


def _vision_tower(config: str, model: str) -> Problem:
    tf = _hf()
    cfg = getattr(tf, config)(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24,
    )  # fmt: skip
    data = [({"pixel_values": torch.randn(N, 3, 8, 8)}, _classes()) for _ in range(2)]
    return _PooledClassifier(getattr(tf, model)(cfg), 16), data, {}


def clip_vision() -> Problem:
    """CLIP's vision tower: a class embedding of shape (D,), expanded to the batch."""
    return _vision_tower("CLIPVisionConfig", "CLIPVisionModel")


def siglip_vision() -> Problem:
    """SigLIP's vision tower: attention pooling with a probe repeated for the batch, the query
    of an nn.MultiheadAttention."""
    return _vision_tower("SiglipVisionConfig", "SiglipVisionModel")


def bit() -> Problem:
    """BiT: weight-standardised convolutions with dynamic "same" padding, group norms then
    activations (BitGroupNormActivation)."""
    tf = _hf()
    cfg = tf.BitConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4, num_labels=3,
        global_padding="SAME",
    )  # fmt: skip
    model = tf.BitForImageClassification(cfg)
    data = [({"pixel_values": torch.randn(N, 3, 17, 17)}, _classes()) for _ in range(2)]
    return model, data, {}


def _t5(layers: int) -> nn.Module:
    cfg = _hf().T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=layers,
        num_decoder_layers=layers, num_heads=2, relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )  # fmt: skip
    return _hf().T5ForConditionalGeneration(cfg)


def t5_shared_embedding() -> Problem:
    data = [({"input_ids": _tokens(), "decoder_input_ids": _tokens()}, _tokens()) for _ in range(2)]
    return _t5(1), data, {"loss": _lm_loss}


def mixtral(experts: str = "eager") -> Problem:
    """Mixtral: a router choosing two of four experts per token, the experts' weights 3-D
    parameters indexed by expert (data-dependent dispatch). ``experts``: transformers' experts
    implementation ("eager" loops over experts and runs in float64; the default "grouped_mm"
    runs in float32 and lower only)."""
    tf = _hf()
    cfg = tf.MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=16, num_labels=3, pad_token_id=0,
        experts_implementation=experts,
    )  # fmt: skip
    data = [({"input_ids": _tokens(low=1)}, _classes()) for _ in range(2)]
    return tf.MixtralForSequenceClassification(cfg), data, {}


def t5_frozen_encoder() -> Problem:
    """T5 with its encoder and shared embedding frozen (the decoder's Fisher alone): the model
    returns the encoder's output, sampled but without a gradient, beside the logits."""
    model = _t5(1)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("encoder.", "shared.")))
    data = [({"input_ids": _tokens(), "decoder_input_ids": _tokens()}, _tokens()) for _ in range(2)]
    return model, data, {"loss": _lm_loss}


def t5_padded() -> Problem:
    """Two encoder layers that share the first one's position bias, and padded samples (the
    attention mask selects from the bias per sample)."""
    model = _t5(2)

    def batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        mask = torch.ones(N, T, dtype=torch.long)
        mask[0, -2:] = mask[2, -1:] = 0
        x = {"input_ids": _tokens(), "attention_mask": mask, "decoder_input_ids": _tokens()}
        return x, _tokens()

    return model, [batch() for _ in range(2)], {"loss": _lm_loss}


def _translations() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Two batches of source and target ids past the special tokens (pad 0, bos 1, eos 2)."""
    return [
        ({"input_ids": _tokens(3), "decoder_input_ids": _tokens(3)}, _tokens(3)) for _ in range(2)
    ]


def fsmt_positions() -> Problem:
    """FSMT: trainable position embeddings (nn.Embedding subclasses) looked up at the ids'
    places, which a check on the ids 0, 1, 2, ... took for the ids' own rows."""
    cfg = _hf().FSMTConfig(
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=2 * T, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return _hf().FSMTForConditionalGeneration(cfg), _translations(), {"loss": _lm_loss}


def prophetnet_positions() -> Problem:
    """ProphetNet: position embeddings called with the batch's shape (a torch.Size), not a
    tensor, so their own call cannot be re-run per sample; the enclosing stacks are."""
    cfg = _hf().ProphetNetConfig(
        vocab_size=VOCAB, hidden_size=16, encoder_ffn_dim=24, decoder_ffn_dim=24,
        num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
        num_decoder_attention_heads=2, max_position_embeddings=2 * T, ngram=2, num_buckets=8,
        relative_max_distance=16, pad_token_id=0, decoder_start_token_id=1,
    )  # fmt: skip
    return _hf().ProphetNetForConditionalGeneration(cfg), _translations(), {"loss": _lm_loss}


# -- torch.nn --------------------------------------------------------------------------------------
class _Encoder(nn.Module):
    """Token + broadcast position embeddings (ids of shape (1, T)), nn.TransformerEncoder in
    either layout, mean pooling, a linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.tokens, self.positions = nn.Embedding(VOCAB, 16), nn.Embedding(T, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device)[None])
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


def encoder_batch_first() -> Problem:
    return _Encoder(True), [(_tokens(), _classes()) for _ in range(2)], {}


def encoder_sequence_first() -> Problem:
    return _Encoder(False), [(_tokens(), _classes()) for _ in range(2)], {}


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(4, 5, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        h = state[0] if isinstance(state, tuple) else state  # (layers, N, H): samples on axis 1
        return self.head(h[-1])


def lstm() -> Problem:
    return _Recurrent(nn.LSTM, True), [(torch.randn(N, T, 4), _classes()) for _ in range(2)], {}


def gru_sequence_first() -> Problem:
    data = [(torch.randn(N, T, 4), _classes()) for _ in range(2)]
    return _Recurrent(nn.GRU, False), data, {}


class _BiasKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def attention_bias_kv() -> Problem:
    return _BiasKV(), [(torch.randn(N, T, 8), _classes()) for _ in range(2)], {}


class _TiedClassifier(nn.Module):
    """An embedding tied to the output layer (a text classifier over the vocabulary)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(x).mean(1))))


def tied_embedding_and_head() -> Problem:
    return _TiedClassifier(), [(_tokens(), _classes(VOCAB)) for _ in range(2)], {}


PROBLEMS: dict[str, Callable[[], Problem]] = {
    f.__name__: f
    for f in (
        bert, gpt2_tied_head, llama, gemma, mixtral, vit, bit, mpnet, clip_vision, siglip_vision,
        t5_shared_embedding, t5_padded, t5_frozen_encoder, fsmt_positions, prophetnet_positions,
        encoder_batch_first,
        encoder_sequence_first, lstm, gru_sequence_first, attention_bias_kv,
        tied_embedding_and_head,
    )
}  # fmt: skip


def _as(dtype: torch.dtype, data: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, torch.Tensor]]:
    from torch.utils._pytree import tree_map

    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return [(tree_map(cast, x), y) for x, y in data]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_matches_the_per_sample_loop(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(random.randrange(2**31))
    model, data, kwargs = PROBLEMS[name]()
    model = model.to(dtype).eval()
    data = _as(dtype, data)
    loss = "cross_entropy" if "loss" not in kwargs else "lm"
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, **kwargs)
    reference = reference_fim_batches(model, data, loss="cross_entropy")
    assert loss in ("cross_entropy", "lm")
    assert set(fim.names) == set(reference), "every trainable parameter gets an entry"
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    if dtype == torch.float32 and errors[worst] > bound:  # the model's own float32 rounding?
        bound = float32_bound(model, data, reference, loss="cross_entropy")
    assert errors[worst] <= bound, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"


@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_a_tied_embedding_and_head_in_every_kind(fisher: str) -> None:
    """The cross term of the tied weight is added in every backward pass (one per class or
    draw for "exact" and "mc"), and agrees with the loop on the same labels."""
    torch.manual_seed(random.randrange(2**31))
    model = _TiedClassifier().double().eval()
    x, y = _tokens(), _classes(VOCAB)
    draws = fisher_fast.sample_labels(model(x), 3, torch.Generator().manual_seed(7))
    fim = fisher_fast.diag_fim(
        model, (x, y), fisher=fisher, mc_samples=3, generator=torch.Generator().manual_seed(7),
        dtype=torch.float64, progress=False, batch_size=3,
    )  # fmt: skip
    assert fim.meta["paths"]["embed.weight"].endswith("tied (with their cross term)")
    reference = reference_fim(model, x, y, fisher=fisher, labels=draws)
    assert relative_error(fim.flat, reference) <= 1e-10


def test_batches_of_different_sequence_lengths() -> None:
    """Position ids (1, T) change shape with T: each new length is planned anew, and exact."""
    torch.manual_seed(random.randrange(2**31))
    model, _, _ = bert()
    model = model.double().eval()
    data = [({"input_ids": torch.randint(0, VOCAB, (N, t))}, _classes()) for t in (6, 4, 6)]
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10


def test_the_fast_paths_are_taken_where_they_apply() -> None:
    """Layers with a rule keep it on real models (only what needs it takes the slow path)."""
    model, data, kwargs = gpt2_tied_head()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False, **kwargs).meta["paths"]
    assert paths["transformer.h.0.attn.c_attn.weight"] == "rule transposed_linear_rule"
    assert paths["transformer.h.0.ln_1.weight"] == "rule layer_norm_rule"
    assert paths["transformer.wte.weight"].startswith("rules embedding_rule and linear_rule, tied")
    assert paths["transformer.wpe.weight"] == (
        "rule embedding_rule on its broadcast output expanded to the samples"
    )
    model, data, kwargs = t5_shared_embedding()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False, **kwargs).meta["paths"]
    assert paths["shared.weight"] == (
        "rules embedding_rule (the calls of 2 embeddings joined) and linear_rule, tied (with "
        "their cross term)"
    )
    model, data, kwargs = t5_padded()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False, **kwargs).meta["paths"]
    for stack in ("encoder", "decoder"):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert paths[bias] == "broadcast use expanded to the samples"
    model, data, kwargs = t5_frozen_encoder()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False, **kwargs).meta["paths"]
    bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert paths[bias] == "broadcast use expanded to the samples"
    model, data, kwargs = gemma()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False, **kwargs).meta["paths"]
    assert paths["model.embed_tokens.weight"].startswith(
        "rules scaled_embedding_rule and linear_rule, tied"
    )
    assert not any(p.startswith("per-sample") for p in paths.values()), paths
    model, data, _ = llama()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False).meta["paths"]
    assert paths["model.layers.0.input_layernorm.weight"] == "rule matched_rms_rule"
    model, data, _ = bit()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False).meta["paths"]
    assert paths["bit.embedder.convolution.weight"] == "rule standardised_conv_rule"
    assert paths["bit.encoder.stages.1.layers.0.norm2.weight"] == "rule norm_act_rule"
    assert not any(p.startswith("per-sample") for p in paths.values()), paths
    model, data, _ = mpnet()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False).meta["paths"]
    assert paths["mpnet.encoder.relative_attention_bias.weight"] == (
        "broadcast use expanded to the samples"
    )
    for problem, name in [
        (clip_vision, "tower.embeddings.class_embedding"),
        (siglip_vision, "tower.head.probe"),
    ]:
        model, data, _ = problem()
        paths = fisher_fast.diag_fim(model.eval(), data, progress=False).meta["paths"]
        assert paths[name] == "broadcast use expanded to the samples", name
        assert not any(p.startswith("per-sample") for p in paths.values()), paths
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3))
    paths = fisher_fast.diag_fim(model, (torch.randn(N, 4), _classes()), progress=False).meta[
        "paths"
    ]
    assert paths["1.weight"] == "rule rms_rule"
    model, data, _ = encoder_sequence_first()
    paths = fisher_fast.diag_fim(model.eval(), data, progress=False).meta["paths"]
    assert paths["encoder.layers.0.linear1.weight"] == "rule linear_rule"  # (T, N, D) calls
    assert paths["encoder.layers.0.self_attn.in_proj_weight"] == "rule attention_rule"
    assert paths["positions.weight"].startswith("rule embedding_rule on its broadcast output")


def test_check_reports_every_parameter_with_its_path(capsys: pytest.CaptureFixture[str]) -> None:
    model, data, _ = encoder_sequence_first()
    report = fisher_fast.check(model.eval(), data, samples=6, batch_size=3)
    assert report.ok and report.samples == 6
    assert {r.name for r in report.rows} == {n for n, _ in model.named_parameters()}
    printed = capsys.readouterr().out
    assert "positions.weight" in printed and "all parameters agree" in printed


class _NormThenTokens(nn.Module):
    """A convolution and a norm whose output is read as tokens, ``flatten(2).transpose(1, 2)``
    (LeViT, XCiT, lambda layers): the gradient reaching the norm then has strides that make
    PyTorch's CPU BatchNorm backward wrong for a batch of one sample."""

    def __init__(self, norm: nn.Module | None = None, inplace: bool = False) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), norm or nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True) if inplace else nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.act(self.norm(self.conv(x))).flatten(2).transpose(1, 2)
        return self.head(torch.tanh(tokens).mean(1))


def _with_running_statistics(model: _NormThenTokens) -> _NormThenTokens:
    model = model.double().eval()
    if model.norm.running_mean is not None:
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 1.5)
    return model


def test_check_is_not_fooled_by_a_batch_of_one() -> None:
    """The reference loop runs each sample as a batch of two copies of itself."""
    torch.manual_seed(random.randrange(2**31))
    model = _with_running_statistics(_NormThenTokens())
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert fisher_fast.check(model, (x, y), samples=6, batch_size=3, verbose=False).ok


_NORMS = {
    "trainable": lambda: nn.BatchNorm2d(4),
    "frozen": lambda: nn.BatchNorm2d(4).requires_grad_(False),
    "no parameters": lambda: nn.BatchNorm2d(4, affine=False),
    "instance norm": lambda: nn.InstanceNorm2d(4, track_running_stats=True),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace relu after"])
@pytest.mark.parametrize("norm", list(_NORMS))
def test_batches_of_one_sample_are_not_fooled_either(norm: str, inplace: bool) -> None:
    """diag_fim over batches of one sample equals diag_fim over batches of three (which check
    verifies above): the gradient reaching the norm is made contiguous for a batch of one, by
    the norm's tap, or by a hook when no rule taps it (its parameters frozen, or none)."""
    torch.manual_seed(random.randrange(2**31))
    model = _with_running_statistics(_NormThenTokens(_NORMS[norm](), inplace))
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    kwargs = {"dtype": torch.float64, "progress": False}
    ones = fisher_fast.diag_fim(model, (x, y), batch_size=1, **kwargs)
    threes = fisher_fast.diag_fim(model, (x, y), batch_size=3, **kwargs)
    assert relative_error(ones.flat, threes.flat.double()) <= 1e-12
    assert not model.norm._forward_hooks  # the hook is removed with the others


@pytest.mark.parametrize("norm", list(_NORMS))
def test_the_tests_reference_loop_is_not_fooled_either(norm: str) -> None:
    """The tests' own per-sample loop (fim_reference.py) runs batches of one sample too: it must
    agree with diag_fim over batches of three."""
    torch.manual_seed(random.randrange(2**31))
    model = _with_running_statistics(_NormThenTokens(_NORMS[norm]()))
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    threes = fisher_fast.diag_fim(model, (x, y), batch_size=3, dtype=torch.float64, progress=False)
    errors = max_relative_error(threes, reference_fim_batches(model, [(x, y)]))
    assert max(errors.values()) <= 1e-12, errors


class _ScaledTokens(_NormThenTokens):
    """_NormThenTokens with a layer-scale gain on the tokens, used in the model's own forward
    (traced, and verified on the planning batch by running its samples alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.conv(x)).flatten(2).transpose(1, 2) * self.gamma
        return self.head(torch.tanh(tokens).mean(1))


def test_the_planning_check_is_not_fooled_by_a_batch_of_one() -> None:
    """The check of a traced parameter runs each planning sample as a batch of one: the norm's
    wrong backward there made it refuse the traced path (XCiT's layer scales, class token and
    position encoding all went to the per-sample path)."""
    torch.manual_seed(random.randrange(2**31))
    model = _with_running_statistics(_ScaledTokens())
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    fim = fisher_fast.diag_fim(model, (x, y), batch_size=3, dtype=torch.float64, progress=False)
    assert fim.meta["paths"]["gamma"] == "broadcast use expanded to the samples"
    errors = max_relative_error(fim, reference_fim_batches(model, [(x, y)]))
    assert max(errors.values()) <= 1e-12, errors


class _LoopedNormTokens(_NormThenTokens):
    """_NormThenTokens after a channel mix that no rule handles, with an ``.item()`` that vmap
    cannot run: the mix's per-sample gradients come from re-running the model one sample at a
    time, through the norm's backward of a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("nchw,cd->ndhw", x, self.mix)
        if x.detach().abs().sum().item() >= 0:  # always; vmap cannot run it
            x = super().forward(x)
        return x


def test_the_one_sample_at_a_time_path_is_not_fooled_either() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _with_running_statistics(_LoopedNormTokens())
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(PerSampleLoopWarning):
        fim = fisher_fast.diag_fim(model, (x, y), batch_size=3, dtype=torch.float64, progress=False)
    assert fim.meta["paths"]["mix"].startswith("per-sample gradients of the model")
    errors = max_relative_error(fim, reference_fim_batches(model, [(x, y)]))
    assert max(errors.values()) <= 1e-12, errors


def test_check_names_a_model_it_cannot_copy() -> None:
    """A tensor with autograd history kept on the model (a cache of an eval-mode forward) makes
    the copy for the reference loop fail: a clear error, not deepcopy's."""
    model = nn.Sequential(nn.Linear(4, 3))
    model.cache = model[0].weight * 2  # type: ignore[assignment]
    with pytest.raises(ValueError, match="autograd history"):
        fisher_fast.check(model, (torch.randn(4, 4), torch.randint(0, 3, (4,))), verbose=False)


class _NoFloat64(nn.Module):
    """A Linear whose forward refuses float64 inputs, as ``torch._grouped_mm`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16, got Double")
        return self.linear(x)


def test_check_runs_its_loop_in_float32_when_the_model_refuses_float64(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _NoFloat64()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.warns(ReferencePrecisionWarning, match="got Double"):
        report = fisher_fast.check(model, (x, y))
    assert report.reference == torch.float32 and report.ok and report.tolerance == 1e-4
    assert "float32 per-sample loop" in capsys.readouterr().out
    assert model.linear.weight.dtype == torch.float32  # the user's model is left as it was
    reference = reference_fim_batches(model.linear, [(x, y)])
    errors = [relative_error(report_fim, reference[name]) for name, report_fim in _fim(model, x, y)]
    assert max(errors) <= 1e-5


def _fim(model: _NoFloat64, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    fim = fisher_fast.diag_fim(model, (x, y), progress=False)
    return [(name.removeprefix("linear."), fim[name]) for name in fim.names]


def test_check_raises_what_the_model_raises_in_float32_too() -> None:
    """The loop's copy fails in every precision: its error, not a float32 report."""

    class FailsWhenCopied(nn.Linear):
        original = 0  # id of the model diag_fim runs on; the loop runs on a copy

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if id(self) != FailsWhenCopied.original:
                raise RuntimeError(f"broken in {x.dtype}")
            return super().forward(x)

    model = FailsWhenCopied(4, 3)
    FailsWhenCopied.original = id(model)
    with pytest.raises(RuntimeError, match=r"broken in torch\.float32"):
        fisher_fast.check(model, (torch.randn(8, 4), torch.randint(0, 3, (8,))), verbose=False)


def test_check_on_mixtral_with_its_default_experts() -> None:
    """transformers' default experts implementation multiplies by ``torch._grouped_mm``, which
    refuses float64: check's loop runs in float32, and agrees."""
    torch.manual_seed(random.randrange(2**31))
    model, data, _ = mixtral(experts="grouped_mm")
    with pytest.warns(ReferencePrecisionWarning):
        report = fisher_fast.check(model.eval(), data, samples=6, verbose=False)
    assert report.reference == torch.float32 and report.ok, str(report)


@pytest.mark.usefixtures("rule_registry")
def test_check_flags_a_wrong_rule() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    @fisher_fast.register_rule(Scale)
    def wrong_rule(
        module: Scale, calls: list[fisher_fast.Call], ctx: fisher_fast.RuleContext
    ) -> None:
        ctx.add("gain", sum(c.grad().sum(0) for c in calls).square())  # batch gradient squared

    model = nn.Sequential(Scale(), nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.warns(CheckFailedWarning, match="0.gain"):
        report = fisher_fast.check(model, (x, y), verbose=False)
    assert not report.ok
    assert [r.name for r in report.rows if not r.ok] == ["0.gain"]


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_a_repeated_call_reuses_its_plan_and_stays_exact(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second call on the same model, on other data of the same shapes, starts from the plan
    the first call kept (fisher_fast/fim/plan_cache.py) and matches the loop on that data."""
    torch.manual_seed(random.randrange(2**31))
    model, first, kwargs = PROBLEMS[name]()
    _, second, _ = PROBLEMS[name]()
    model = model.double().eval()
    first, second = _as(torch.float64, first), _as(torch.float64, second)
    plans = CallCounter(monkeypatch, engine, "make_plan")
    fisher_fast.diag_fim(model, first, progress=False, dtype=torch.float64, **kwargs)
    planned = plans.calls  # one plan per attempt: a verification may refuse the first ones
    assert planned >= 1
    fim = fisher_fast.diag_fim(model, second, progress=False, dtype=torch.float64, **kwargs)
    assert plans.calls == planned, "the second call planned again"
    errors = max_relative_error(fim, reference_fim_batches(model, second, loss="cross_entropy"))
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-10, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"
