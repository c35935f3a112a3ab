"""Embeddings of ids shared by all samples (position ids (1, T)): the expanded fast path.

GPT-2's ``wpe`` and BERT's ``position_embeddings`` return (1, T, D), broadcast against the
samples. diag_fim gives that output the sample axis and uses the Embedding rule, after checking
on the planning batch that the model treats the expanded output as the broadcast one
(fisher_fast/fim/expansion.py). Each case is compared with a float64 per-sample loop; models
whose code would treat the expanded output otherwise (``pos[0]``, ``pos.squeeze(0).mean(0)``,
a shape check) must keep today's per-sample path, and its exact numbers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fim_reference import max_relative_error, reference_fim, reference_fim_batches, relative_error
from torch import nn

import fisher_fast
from fisher_fast.fim.expansion import PATH_SUFFIX

VOCAB, T, N, D = 40, 6, 5, 16
KINDS = ["empirical", "mc", "exact"]
FAST = f"rule embedding_rule {PATH_SUFFIX}"


def _hf() -> Any:
    return pytest.importorskip("transformers")


def _gpt2(tied: bool) -> nn.Module:
    tf = _hf()
    cfg = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=2, n_positions=16, tie_word_embeddings=tied
    )
    model = tf.GPT2LMHeadModel(cfg)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    return model


def _bert() -> nn.Module:
    tf = _hf()
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return tf.BertForSequenceClassification(cfg)


def _lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


class _Logits(nn.Module):
    """A Hugging Face model called on token ids, returning (N, C) logits (the last position's
    for a language model), so that every Fisher kind applies."""

    def __init__(self, inner: nn.Module, last: bool) -> None:
        super().__init__()
        self.inner, self.last = inner, last

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.inner(input_ids=ids).logits
        return logits[:, -1] if self.last else logits


# Where the position embedding's parameter is, and the number of classes, per model.
HF_MODELS: dict[str, tuple[Callable[[], nn.Module], str, int]] = {
    "gpt2_tied": (lambda: _Logits(_gpt2(True), True), "inner.transformer.wpe.weight", VOCAB),
    "gpt2_untied": (lambda: _Logits(_gpt2(False), True), "inner.transformer.wpe.weight", VOCAB),
    "bert": (
        lambda: _Logits(_bert(), False),
        "inner.bert.embeddings.position_embeddings.weight",
        3,
    ),
}


def _fim_and_reference(
    model: nn.Module, x: torch.Tensor, classes: int, fisher: str
) -> tuple[fisher_fast.DiagFIM, torch.Tensor]:
    y = torch.randint(0, classes, (x.shape[0],))
    draws = fisher_fast.sample_labels(model(x), 3, torch.Generator().manual_seed(7))
    fim = fisher_fast.diag_fim(
        model, (x, y), fisher=fisher, mc_samples=3, generator=torch.Generator().manual_seed(7),
        dtype=torch.float64, progress=False, batch_size=3,
    )  # fmt: skip
    return fim, reference_fim(model, x, y, fisher=fisher, labels=draws)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_language_model_takes_the_fast_path(tied: bool) -> None:
    """The loss over every position, in two batches: wpe by its rule, exact to 1e-10."""
    torch.manual_seed(random.randrange(2**31))
    model = _gpt2(tied).double().eval()
    data = [({"input_ids": torch.randint(0, VOCAB, (N, T))}, torch.randint(0, VOCAB, (N, T)))]
    data.append(({"input_ids": torch.randint(0, VOCAB, (N, T))}, torch.randint(0, VOCAB, (N, T))))
    fim = fisher_fast.diag_fim(model, data, loss=_lm_loss, dtype=torch.float64, progress=False)
    assert fim.meta["paths"]["transformer.wpe.weight"] == FAST
    assert not any(p.startswith("per-sample") for p in fim.meta["paths"].values())
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    assert not model.transformer.wpe._forward_hooks, "the expansion's hooks are removed"


@pytest.mark.parametrize("fisher", KINDS)
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_position_embeddings_in_every_kind(name: str, fisher: str) -> None:
    torch.manual_seed(random.randrange(2**31))
    build, position, classes = HF_MODELS[name]
    model = build().double().eval()
    fim, reference = _fim_and_reference(model, torch.randint(0, VOCAB, (N, T)), classes, fisher)
    assert fim.meta["paths"][position] == FAST
    assert relative_error(fim.flat, reference) <= 1e-10


def test_bert_takes_no_per_sample_path() -> None:
    """BERT's token_type_ids come from a shared buffer expanded to (N, T): a plain rule."""
    torch.manual_seed(random.randrange(2**31))
    model = _bert().double().eval()
    data = [({"input_ids": torch.randint(0, VOCAB, (N, T))}, torch.randint(0, 3, (N,)))]
    fim = fisher_fast.diag_fim(model, data, dtype=torch.float64, progress=False)
    paths = fim.meta["paths"]
    assert paths["bert.embeddings.position_embeddings.weight"] == FAST
    assert not any(p.startswith("per-sample") for p in paths.values()), paths
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors


# How the synthetic model uses its (1, T, D) position embeddings; all but "added" would compute
# something else with the output expanded to (N, T, D) (or fail), so they keep the old path.
USES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "added": lambda pos: pos,
    "first_row": lambda pos: pos[0],  # same values expanded, but only sample 0 gets a gradient
    "squeezed_mean": lambda pos: pos.squeeze(0).mean(0),  # over positions, or over samples
    "shape_checked": lambda pos: pos if pos.shape[0] == 1 else pos.new_full((), float("nan")),
}


def _refuse_expanded(pos: torch.Tensor) -> torch.Tensor:
    if pos.shape[0] != 1:
        raise ValueError("position embeddings must have a leading axis of 1")
    return pos


USES["shape_asserted"] = _refuse_expanded


class _Positions(nn.Module):
    """Token embeddings plus position embeddings of ids (1, T), used as ``use`` says."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = USES[use]
        self.tokens, self.positions = nn.Embedding(VOCAB, D), nn.Embedding(T, D)
        self.mix, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.positions(torch.arange(x.shape[1], device=x.device)[None])
        h = self.tokens(x) + self.use(pos)
        return self.head(torch.tanh(self.mix(h)).mean(1))


@pytest.mark.parametrize("fisher", KINDS)
@pytest.mark.parametrize("use", list(USES))
def test_expansion_only_where_the_model_treats_it_alike(use: str, fisher: str) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _Positions(use).double().eval()
    fim, reference = _fim_and_reference(model, torch.randint(0, VOCAB, (N, T)), 3, fisher)
    path = fim.meta["paths"]["positions.weight"]
    if use == "added":
        assert path == FAST
    else:
        assert path == "per-sample gradients of the model (_Positions)"
    assert relative_error(fim.flat, reference) <= 1e-10
    assert not model.positions._forward_hooks


@pytest.mark.parametrize("use", ["added", "first_row"])
def test_a_first_batch_of_one_sample(use: str) -> None:
    """Planned on one sample (the variant batch repeats it), then used on batches of more."""
    torch.manual_seed(random.randrange(2**31))
    model = _Positions(use).double().eval()
    data = [(torch.randint(0, VOCAB, (k, T)), torch.randint(0, 3, (k,))) for k in (1, 4, 3)]
    fim = fisher_fast.diag_fim(model, data, dtype=torch.float64, progress=False)
    assert (fim.meta["paths"]["positions.weight"] == FAST) == (use == "added")
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
