"""nn.LSTM and nn.GRU on the per-sample path, through their recurrence written out in
elementary ops (fim/rnn_replica.py): exact against a float64 per-sample loop in every covered
configuration, batched by vmap (no one-sample-at-a-time loop), and equal to the fused op."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast
from fisher_fast.fim.fallback import PerSampleLoopWarning
from fisher_fast.fim.rnn_replica import replica

N, T, FEATURES, HIDDEN = 5, 4, 3, 4

CONFIGS = {
    "lstm 2 layers bidirectional, initial state": (nn.LSTM, dict(num_layers=2, bidirectional=True), True, True),
    "lstm sequence-first, no bias, initial state": (nn.LSTM, dict(bias=False), False, True),
    "gru 2 layers bidirectional": (nn.GRU, dict(num_layers=2, bidirectional=True), True, False),
    "gru sequence-first, initial state": (nn.GRU, dict(), False, True),
}  # fmt: skip


class Classifier(nn.Module):
    """A recurrent layer (optionally started from a learned, per-sample-projected state) and a
    linear head on its last output and final hidden state."""

    def __init__(self, cell: type[nn.RNNBase], options: dict, batch_first: bool, state: bool):
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=batch_first, **options)
        self.batch_first, self.with_state = batch_first, state
        dirs = 2 if self.rnn.bidirectional else 1
        if state:
            self.start = nn.Linear(FEATURES, HIDDEN * dirs * self.rnn.num_layers)
        self.head = nn.Linear(HIDDEN * dirs + HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x if self.batch_first else x.transpose(0, 1)
        args: tuple = (seq,)
        if self.with_state:  # (layers * dirs, N, H) from the sample's first step
            h0 = self.start(x[:, 0]).view(len(x), -1, HIDDEN).transpose(0, 1).contiguous()
            args = (seq, (h0, torch.tanh(h0)) if isinstance(self.rnn, nn.LSTM) else h0)
        out, state = self.rnn(*args)
        h = state[0] if isinstance(state, tuple) else state
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(torch.cat([last, h[-1]], dim=1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recurrent_layers_are_exact_and_batched(name: str) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = Classifier(*CONFIGS[name]).double().eval()
    data = [
        (torch.randn(N, T, FEATURES, dtype=torch.float64), torch.randint(0, 3, (N,)))
        for _ in range(2)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleLoopWarning)
        fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-10, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"
    assert any(n.startswith("rnn.") for n in fim.names)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_replica_equals_the_fused_op(name: str) -> None:
    cell, options, batch_first, _ = CONFIGS[name]
    rnn = cell(FEATURES, HIDDEN, batch_first=batch_first, **options).double().eval()
    dirs = 2 if rnn.bidirectional else 1
    x = torch.randn(N, T, FEATURES, dtype=torch.float64)
    seq = x if batch_first else x.transpose(0, 1)
    h0 = torch.randn(rnn.num_layers * dirs, N, HIDDEN, dtype=torch.float64)
    for args in ((seq,), (seq, (h0, h0.cos()) if cell is nn.LSTM else h0)):
        forward = replica(rnn, args, {})
        assert forward is not None
        got = forward(dict(rnn.named_parameters()), args, {})
        want = rnn(*args)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_what_the_replica_does_not_cover_is_left_to_the_module() -> None:
    x = torch.randn(2, T, FEATURES)
    assert replica(nn.LSTM(FEATURES, HIDDEN, proj_size=2), (x,), {}) is None
    assert replica(nn.LSTM(FEATURES, HIDDEN), (x[0],), {}) is None  # unbatched
    assert replica(nn.LSTM(FEATURES, HIDDEN), (x,), {"hx": None}) is None
    assert replica(nn.RNN(FEATURES, HIDDEN), (x,), {}) is None
    training = nn.GRU(FEATURES, HIDDEN, num_layers=2, dropout=0.5).train()
    assert replica(training, (x,), {}) is None
