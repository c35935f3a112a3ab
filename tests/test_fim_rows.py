"""add_rows: the sorted, atomic-free sum used on accelerators, checked on the CPU against
index_add_ and, inside diag_fim, against a float64 per-sample loop."""

from __future__ import annotations

import pytest
import torch
from fim_reference import reference_fim, relative_error
from torch import nn

import fisher_fast
from fisher_fast.fim import rows


@pytest.fixture
def sorted_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator's path of add_rows, on the CPU."""
    monkeypatch.setattr(rows, "adds_with_atomics", lambda device: True)


@pytest.mark.usefixtures("sorted_path")
@pytest.mark.parametrize("count", [0, 1, 300], ids=["empty", "one", "repeats"])
def test_sorted_sum_equals_index_add(count: int, gen: torch.Generator) -> None:
    keys = torch.randint(0, 17, (count,), generator=gen)
    values = torch.randn(count, 5, dtype=torch.float64, generator=gen)
    start = torch.randn(17, 5, dtype=torch.float64, generator=gen)
    expected = start.clone().index_add_(0, keys, values)
    out = start.clone()
    rows.add_rows(out, keys, values)
    assert torch.allclose(out, expected, rtol=1e-13, atol=1e-13)


class TiedTokens(nn.Module):
    """An Embedding with padding_idx beside an Embedding tied to the output layer."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.pad = nn.Embedding(vocab, 4, padding_idx=0)
        self.embed = nn.Embedding(vocab, 4)
        self.out = nn.Linear(4, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(ids) + self.pad(ids)).mean(1))


@pytest.mark.usefixtures("sorted_path")
def test_diag_fim_with_the_sorted_path_is_exact_and_repeatable(gen: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = TiedTokens().double().eval()
    ids = torch.randint(0, 4, (9, 12), generator=gen)  # few ids: many repeats per sample
    y = torch.randint(0, 11, (9,), generator=gen)
    first = fisher_fast.diag_fim(model, (ids, y), dtype=torch.float64, batch_size=5, progress=False)
    again = fisher_fast.diag_fim(model, (ids, y), dtype=torch.float64, batch_size=5, progress=False)
    assert torch.equal(first.flat, again.flat)
    assert relative_error(first.flat, reference_fim(model, ids, y)) <= 1e-10
