"""An Embedding and a Linear head that share one weight (a language model's tied head).

The shared weight's per-sample gradient is a_n + b_n, the embedding's plus the head's, so
sum_n (a_n + b_n)^2 = sum_n a_n^2 + sum_n b_n^2 + 2 sum_n a_n ∘ b_n. The two rules add the
first two terms as usual; this adds the cross term without any N × vocabulary × dim tensor.
With ids (N, Te), embedding output gradient gE (N, Te, D), head input x (N, Th, D) and head
output gradient gH (N, Th, V): a_n[v] = sum over the positions t of sample n holding v of
gE[n, t], and b_n[v] = sum_s gH[n, s, v] x[n, s], so

    sum_n a_n[v] ∘ b_n[v] = sum over (n, t) with ids[n, t] = v of gE[n, t] ∘ b_n[ids[n, t]],

where the rows b_n[ids[n, t]] = sum_s gH[n, s, ids[n, t]] x[n, s] are one gather and one
batched product ((N, Te, Th) @ (N, Th, D)), added to the accumulator's rows in place
(rows.add_rows: a fixed order, no host sync). Used only for an Embedding without padding_idx,
max_norm or scale_grad_by_freq (plan.py checks).
"""

from __future__ import annotations

import torch

from fisher_fast.fim.rows import add_rows
from fisher_fast.fim.rules import Call, joined


class TiedCross:
    """Collects one backward pass's calls of both modules and adds the cross term once both
    have arrived (in either order)."""

    def __init__(self, target: torch.Tensor, work: torch.dtype) -> None:
        self.target = target  # the accumulator's view of the shared weight, (V, D)
        self.work = work
        self._embedding: tuple[torch.Tensor, torch.Tensor] | None = None
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None

    def embedding_calls(self, calls: list[Call], n: int) -> None:
        dim = self.target.shape[1]
        ids = joined([c.input.reshape(n, -1) for c in calls], dim=1)
        g = joined([c.grad().reshape(n, -1, dim) for c in calls], dim=1).to(self.work)
        self._embedding = (ids, g)
        self._add_if_complete()

    def head_calls(self, calls: list[Call], n: int) -> None:
        vocab, dim = self.target.shape
        x = joined([c.input.reshape(n, -1, dim) for c in calls], dim=1).to(self.work)
        g = joined([c.grad().reshape(n, -1, vocab) for c in calls], dim=1).to(self.work)
        self._head = (x, g)
        self._add_if_complete()

    def _add_if_complete(self) -> None:
        if self._embedding is None or self._head is None:
            return
        (ids, g_e), (x, g_h) = self._embedding, self._head
        self._embedding = self._head = None
        n, t_e = ids.shape
        picked = g_h.gather(2, ids[:, None, :].expand(n, g_h.shape[1], t_e))  # (N, Th, Te)
        rows = torch.bmm(picked.transpose(1, 2), x)  # (N, Te, D): b_n[ids[n, t]]
        terms = (g_e * rows).mul_(2).reshape(-1, rows.shape[-1]).to(self.target.dtype)
        add_rows(self.target, ids.reshape(-1), terms)  # into the accumulator: no V × D temporary
