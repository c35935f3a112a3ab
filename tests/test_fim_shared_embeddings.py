"""Embeddings sharing one weight, with or without a Linear head tied to it (rules/tied.py).

An encoder-decoder's encoder and decoder embed their tokens with one table (T5's ``shared``,
held by a module that never runs, and by both ``embed_tokens``). The table's per-sample gradient
sums both embeddings' uses before it is squared: the embeddings' calls are joined and the rule
runs once on them, plus the cross term with a tied head. Each case is compared with the float64
per-sample loop; the ids of both embeddings overlap within samples (a small vocabulary), so
squaring each embedding's part apart would be wrong.
"""

from __future__ import annotations

import random

import pytest
import torch
from fim_reference import max_relative_error, reference_fim, reference_fim_batches, relative_error
from torch import nn

import fisher_fast

N, VOCAB, D, CLASSES = 5, 6, 8, 3


class SharedTable(nn.Module):
    """Encoder and decoder embeddings of one table (also held by ``shared``, which never runs),
    and a head that is a Linear of its own or the table itself."""

    def __init__(self, tied_head: bool) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, D)
        self.encoder_embed, self.decoder_embed = nn.Embedding(VOCAB, D), nn.Embedding(VOCAB, D)
        self.encoder_embed.weight = self.decoder_embed.weight = self.shared.weight
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB if tied_head else CLASSES, bias=False)
        if tied_head:
            self.head.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        source, target = ids[:, :4], ids[:, 4:]  # the encoder's tokens, the decoder's
        h = torch.tanh(self.mix(self.encoder_embed(source).mean(1)))
        return self.head(h + self.decoder_embed(target).mean(1))[:, :CLASSES]


def _data(batches: int = 2) -> list:
    return [
        (torch.randint(0, VOCAB, (N, 7)), torch.randint(0, CLASSES, (N,))) for _ in range(batches)
    ]


@pytest.mark.parametrize("tied_head", [False, True], ids=["no head", "tied head"])
def test_embeddings_sharing_a_table_are_exact_by_their_rules(tied_head: bool) -> None:
    torch.manual_seed(random.randrange(2**31))
    model, data = SharedTable(tied_head).double(), _data()
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, reuse_plan=False)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    path = fim.meta["paths"]["shared.weight"]
    assert path.startswith("rule" + "s" * tied_head + " embedding_rule (the calls of 2 embeddings")
    assert path.endswith("tied (with their cross term)") == tied_head


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_every_backward_pass_joins_its_own_calls(fisher: str) -> None:
    """With several backward passes per batch (one per draw or class), each pass's calls are
    joined and the cross term added once per pass."""
    torch.manual_seed(random.randrange(2**31))
    model, ((ids, _),) = SharedTable(True).double().eval(), _data(1)
    labels = fisher_fast.sample_labels(model(ids), 2, torch.Generator().manual_seed(3))
    fim = fisher_fast.diag_fim(
        model, [(ids, torch.zeros(N, dtype=torch.long))], fisher=fisher, mc_samples=2,
        generator=torch.Generator().manual_seed(3), dtype=torch.float64, progress=False,
    )  # fmt: skip
    reference = reference_fim(model, ids, None, fisher=fisher, labels=labels)
    assert relative_error(fim.flat, reference) <= 1e-10


def test_a_plan_kept_between_calls_joins_the_calls_again() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = SharedTable(True).double()
    fisher_fast.diag_fim(model, _data(), progress=False, dtype=torch.float64)
    data = _data()
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors


# -- embeddings that scale their rows (Gemma's) and padding rows --------------------------------
class ScaledEmbedding(nn.Embedding):
    """Rows times a constant buffer, as Gemma's ``GemmaTextScaledWordEmbedding`` returns."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.register_buffer("scale", torch.tensor(D**0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


class ShiftedEmbedding(nn.Embedding):
    """Rows plus one: not a scaling, so no rule of the embedding's applies."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 1.0


class PositionEmbedding(nn.Embedding):
    """Rows looked up at the ids' positions (FSMT's, fairseq's learned position embeddings):
    position p + 1 for the p-th id that is not padding (here modulo the table's size). On the
    ids 0, 1, 2, ... of a single sequence it returns the ids' own rows, yet it is no scaling of
    them."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(0).long()
        return super().forward(torch.cumsum(mask, dim=1) * mask % self.num_embeddings)


class LanguageModel(nn.Module):
    """Token embedding (any class), a mixing layer, and a head tied to the embedding or not."""

    def __init__(self, embedding: nn.Embedding, tied: bool) -> None:
        super().__init__()
        self.embed, self.mix = embedding, nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))).mean(1))[:, :CLASSES]


EMBEDDINGS = {
    "scaled": (lambda: ScaledEmbedding(VOCAB, D), "rules scaled_embedding_rule and linear_rule"),
    "scaled, padding 0": (
        lambda: ScaledEmbedding(VOCAB, D, padding_idx=0),
        "rules scaled_embedding_rule and linear_rule",
    ),
    "plain, padding 0": (
        lambda: nn.Embedding(VOCAB, D, padding_idx=0),
        "rules embedding_rule and linear_rule",
    ),
    "shifted": (lambda: ShiftedEmbedding(VOCAB, D), "per-sample gradients of"),
    "positions": (lambda: PositionEmbedding(VOCAB, D), "per-sample gradients of"),
}


@pytest.mark.parametrize("kind", list(EMBEDDINGS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_scaled_and_padded_embeddings(kind: str, tied: bool) -> None:
    """A scaling subclass has a rule of its own, also tied to a head; padding rows add no cross
    term; a subclass that computes anything else goes per sample. All exact."""
    torch.manual_seed(random.randrange(2**31))
    make, tied_path = EMBEDDINGS[kind]
    model = LanguageModel(make(), tied).double()
    data = _data()
    for ids, _ in data:
        ids[:, 0] = 0  # every sample holds the padding row
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, reuse_plan=False)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
    path = fim.meta["paths"]["embed.weight"]
    if tied or kind in ("shifted", "positions"):
        assert path.startswith(tied_path), path
    else:
        assert path == tied_path.split(" and ")[0].replace("rules", "rule"), path
