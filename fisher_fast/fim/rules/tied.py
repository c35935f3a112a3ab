"""One weight shared by Embeddings and at most one Linear head (a language model's tied head,
an encoder-decoder's shared token embedding).

The shared weight's per-sample gradient is the sum over its modules' uses, a_n + b_n with a_n
the embeddings' and b_n the head's, so sum_n (a_n + b_n)^2 = sum_n a_n^2 + sum_n b_n^2 +
2 sum_n a_n ∘ b_n. Several Embeddings (T5's encoder and decoder ``embed_tokens``) count as one:
their calls are joined along the positions and the embedding rule runs once on all of them, so
a_n sums every embedding's use before it is squared. The head's rule adds the second term as
usual, and the cross term is added without any N × vocabulary × dim tensor. With ids (N, Te),
embedding output gradient gE (N, Te, D), head input x (N, Th, D) and head output gradient gH
(N, Th, V): a_n[v] = sum over the positions t of sample n holding v of gE[n, t], and
b_n[v] = sum_s gH[n, s, v] x[n, s], so

    sum_n a_n[v] ∘ b_n[v] = sum over (n, t) with ids[n, t] = v of gE[n, t] ∘ b_n[ids[n, t]],

where the rows b_n[ids[n, t]] = sum_s gH[n, s, ids[n, t]] x[n, s] are one gather and one
batched product ((N, Te, Th) @ (N, Th, D)), added to the accumulator's rows in place
(rows.add_rows: a fixed order, no host sync); positions holding padding_idx get no embedding
gradient, so they add no cross term either. Used only for Embeddings without max_norm or
scale_grad_by_freq, with one padding_idx and one row scale (plan.py checks; a scaled
embedding's a_n carries its scale, scaled_embedding.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fisher_fast.fim.rows import add_rows
from fisher_fast.fim.rules import Call, joined
from fisher_fast.fim.rules.embedding import without_padding
from fisher_fast.fim.rules.scaled_embedding import row_scale

Compute = Callable[[list[Call]], None]  # a module's rule applied to calls


class SharedWeight:
    """Collects one backward pass's calls of every module sharing the weight and, once all have
    arrived (in any order), runs the embedding rule on the embeddings' calls joined and adds the
    cross term with the head's."""

    def __init__(
        self,
        target: torch.Tensor,
        work: torch.dtype,
        embeddings: Sequence[nn.Embedding],
        head: nn.Module | None,
    ) -> None:
        self.target = target  # the accumulator's view of the shared weight, (V, D)
        self.work = work
        self.embeddings = list(embeddings)
        scale = row_scale(self.embeddings[0])  # the same for all (plan.py)
        assert scale is not None
        self.row_scale = scale  # the embeddings' rows are scaled by it (scaled_embedding.py)
        self.head = head
        self._calls: dict[nn.Module, list[Call]] = {}
        self._compute: dict[nn.Module, Compute] = {}
        self._n = 0

    def arrive(self, module: nn.Module, calls: list[Call], n: int, compute: Compute) -> None:
        """One module's calls of this pass (``compute``: its rule on given calls). The head's
        rule runs at once; the embeddings' waits for all of them."""
        if module in self._calls:
            raise AssertionError("a module sharing a weight ran twice in one pass")
        if module is self.head:
            compute(calls)
        # The capture drops a processed call's gradients and inputs: keep this pass's own.
        kept = [dataclasses.replace(c, grads=list(c.grads)) for c in calls]
        self._calls[module], self._compute[module], self._n = kept, compute, n
        if len(self._calls) < len(self.embeddings) + (self.head is not None):
            return
        joined_calls = [c for m in self.embeddings for c in self._calls[m]]
        self._compute[self.embeddings[0]](joined_calls)
        if self.head is not None:
            self._add_cross(joined_calls, self._calls[self.head])
        self._calls, self._compute = {}, {}

    def _add_cross(self, embedding_calls: list[Call], head_calls: list[Call]) -> None:
        n, (vocab, dim) = self._n, self.target.shape
        ids = joined([c.input.reshape(n, -1) for c in embedding_calls], dim=1)
        g_e = joined([c.grad().reshape(n, -1, dim) for c in embedding_calls], dim=1).to(self.work)
        g_e = without_padding(self.embeddings[0], ids, g_e)  # one padding_idx for all (plan.py)
        x = joined([c.input.reshape(n, -1, dim) for c in head_calls], dim=1).to(self.work)
        g_h = joined([c.grad().reshape(n, -1, vocab) for c in head_calls], dim=1).to(self.work)
        t_e = ids.shape[1]
        picked = g_h.gather(2, ids[:, None, :].expand(n, g_h.shape[1], t_e))  # (N, Th, Te)
        rows = torch.bmm(picked.transpose(1, 2), x)  # (N, Te, D): b_n[ids[n, t]]
        terms = (g_e * rows).mul_(2 * self.row_scale).reshape(-1, rows.shape[-1])
        terms = terms.to(self.target.dtype)
        add_rows(self.target, ids.reshape(-1), terms)  # into the accumulator: no V × D temporary
