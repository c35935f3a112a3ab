"""Embeddings that scale their rows by a constant: Gemma's ``GemmaTextScaledWordEmbedding``
returns ``embedding(ids) * sqrt(hidden)`` (a subclass of nn.Embedding with a forward of its own).

The per-sample gradient of a row is the output gradient times the scale, summed as for
nn.Embedding (embedding.py). Whether a subclass computes exactly that is not assumed: its own
forward runs on a few ids and must equal nn.Embedding's output times one constant, which the
rule then reads from the same comparison each time it runs (a buffer such as ``embed_scale``
may be changed by the user). The ids are scrambled, and given twice in two orders: a position
embedding that looks its rows up at the ids' places (FSMT's, fairseq's) returns on the ids
0, 1, 2, ... of one sequence the very rows of those ids.
"""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, register_matched_rule
from fisher_fast.fim.rules.embedding import add_row_squares

_IDS = 8  # rows looked up by the check


@torch.no_grad()
def output_scale(module: nn.Module) -> float | None:
    """c when ``module`` (an nn.Embedding subclass with its own forward) returns its rows times
    the constant c, else None."""
    if not isinstance(module, nn.Embedding) or type(module).forward is nn.Embedding.forward:
        return None
    if module.max_norm is not None or module.num_embeddings == 0:
        return None
    ids = _probe_ids(module.num_embeddings).to(module.weight.device)
    try:
        got = type(module).forward(module, ids)
    except Exception:  # a forward that takes other inputs is not this formula
        return None
    rows = nn.Embedding.forward(module, ids)
    if not isinstance(got, torch.Tensor) or got.shape != rows.shape:
        return None
    norm = float(rows.double().square().sum())
    if norm == 0.0:
        return None
    scale = float((got.double() * rows.double()).sum()) / norm
    tol = 1e-2 if rows.element_size() <= 2 else 1e-5
    same = torch.allclose(got.double(), rows.double() * scale, rtol=tol, atol=tol * 1e-2)
    return scale if same else None


def _probe_ids(rows: int) -> torch.Tensor:
    """(2, k) ids: k distinct rows spread over a table of ``rows``, in a scrambled order, then
    the same reversed, so that no id sits at its own place in both sequences (k ≥ 2). Made
    without a permutation of the whole table: the rule checks again on every batch."""
    k = min(_IDS, rows)
    spread = torch.arange(k) * (rows // k)
    picked = spread[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    return torch.stack((picked, picked.flip(0)))


def row_scale(module: nn.Module) -> float | None:
    """The constant an Embedding multiplies its rows by: 1 for nn.Embedding's own forward, the
    verified constant for a scaling subclass, None for anything else."""
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return 1.0
    return output_scale(module)


def _is_scaled_embedding(module: nn.Module) -> bool:
    return output_scale(module) is not None


def scaled_embedding_rule(module: nn.Embedding, calls: list[Call], ctx: RuleContext) -> None:
    scale = output_scale(module)
    if scale is None:
        raise RuntimeError(
            f"{type(module).__name__} no longer returns its rows times a constant; run diag_fim "
            "with reuse_plan=False so that it is planned again"
        )
    add_row_squares(module, calls, ctx, scale)


register_matched_rule(_is_scaled_embedding, RuleSpec(scaled_embedding_rule, layout="positionwise"))
