"""diag_fim's per-batch path makes no host-device sync once the first batch is planned.

Each later batch (forward pass, objectives, label check, backward passes, every rule, the
finiteness flags) runs under ``host_syncs.NoHostSync``, with what a GPU runs: the atomic-free
sorted sums of rows.py and finiteness and label flags read only at the end. Planning the first
batch may sync, and so does the final read of the flags. The result must still match the float64
per-sample loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fim_reference import reference_fim, relative_error
from host_syncs import SETTINGS, HostSyncError, NoHostSync, Setting, no_host_sync

import fisher_fast
from fisher_fast.fim import engine, finite_guard, rows
from fisher_fast.fim.finite_guard import FiniteGuard
from fisher_fast.fim.rules import Call, RuleContext, embedding

N, BATCH = 12, 4  # three batches: one planned, two in the steady state


@pytest.fixture
def gpu_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's choices on the CPU: sorted sums of rows, flags read only when the data ends."""
    monkeypatch.setattr(rows, "adds_with_atomics", lambda device: True)
    monkeypatch.setattr(finite_guard, "batches_between_reads", lambda device: 10**9)


@pytest.fixture
def steady_state_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every batch after the first planned one runs under ``no_host_sync``, and so does each
    batch's flagging of the accumulator; yields the sizes of the batches checked so."""
    checked: list[int] = []
    step, batch = engine._Accumulation._step, FiniteGuard.batch

    def checked_step(self: Any, *args: Any) -> None:
        if self.sums is None:  # planning: may sync
            step(self, *args)
            return
        with no_host_sync(monkeypatch):
            step(self, *args)
        checked.append(args[2])  # (inputs, targets, n, samples)

    def checked_batch(self: FiniteGuard, *args: Any) -> None:
        with no_host_sync(monkeypatch):
            batch(self, *args)

    monkeypatch.setattr(engine._Accumulation, "_step", checked_step)
    monkeypatch.setattr(FiniteGuard, "batch", checked_batch)
    yield checked


@pytest.mark.usefixtures("gpu_schedule")
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.id for s in SETTINGS])
def test_steady_state_batches_make_no_host_sync(
    setting: Setting, steady_state_checked: list[int], gen: torch.Generator
) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = setting.model().double().eval()
    x, y = setting.inputs(N, gen), torch.randint(0, 5, (N,), generator=gen)
    fim = fisher_fast.diag_fim(
        model, (x, y), batch_size=BATCH, dtype=torch.float64, progress=False, **setting.options
    )
    assert steady_state_checked == [BATCH] * (N // BATCH - 1)
    if setting.options.get("fisher", "empirical") != "mc":  # mc draws its own labels
        reference = reference_fim(model, x, y, fisher=setting.options.get("fisher", "empirical"))
        assert relative_error(fim.flat, reference) <= 1e-10


def test_the_detector_catches_each_kind_of_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.arange(6)
    reads = [
        lambda: int(t.max()),
        lambda: bool(t.any()),
        lambda: t.tolist(),
        lambda: t[t > 2],
        lambda: torch.unique(t),
        lambda: torch.segment_reduce(t.double(), "sum", lengths=torch.tensor([2, 4])),
    ]
    for read in reads:
        with pytest.raises(HostSyncError), no_host_sync(monkeypatch):
            read()
    with NoHostSync():  # fixed-size work passes
        torch.segment_reduce(t.double(), "sum", offsets=torch.tensor([0, 2, 6]), unsafe=True)
        torch.searchsorted(t, t.flip(0).clamp(max=3))


def test_the_embedding_rule_alone_makes_no_host_sync(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """The rule on a batch with padding and repeats, each row checked against the plain sum."""
    module = torch.nn.Embedding(7, 3, padding_idx=1, scale_grad_by_freq=True)
    ids = torch.randint(0, 4, (5, 8), generator=gen)
    g = torch.randn(5, 8, 3, dtype=torch.float64, generator=gen)
    acc = torch.zeros(7, 3, dtype=torch.float64)
    call = Call((ids,), {}, [(g.shape, g.dtype, g.device)], [g])
    ctx = RuleContext(torch.float64, "torch", lambda n, v: None, lambda n: acc)
    monkeypatch.setattr(rows, "adds_with_atomics", lambda device: True)
    with no_host_sync(monkeypatch):
        embedding.embedding_rule(module, [call], ctx)
    expected = torch.zeros(7, 3, dtype=torch.float64)
    for n in range(5):
        per_sample = torch.zeros(7, 3, dtype=torch.float64).index_add_(0, ids[n], g[n])
        per_sample /= torch.bincount(ids[n], minlength=7).clamp(min=1).unsqueeze(1)
        per_sample[1] = 0
        expected += per_sample.square()
    assert torch.allclose(acc, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("count", [1, 300], ids=["one", "repeats"])
def test_add_rows_on_the_gpu_path_makes_no_host_sync(
    count: int, monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    keys = torch.randint(0, 17, (count,), generator=gen)
    values = torch.randn(count, 5, dtype=torch.float64, generator=gen)
    out = torch.randn(17, 5, dtype=torch.float64, generator=gen)
    expected = out.clone().index_add_(0, keys, values)
    monkeypatch.setattr(rows, "adds_with_atomics", lambda device: True)
    with no_host_sync(monkeypatch):
        rows.add_rows(out, keys, values)
    assert torch.allclose(out, expected, rtol=1e-13, atol=1e-13)
