"""nn.LSTM and nn.GRU: by their rule (fim/rules/recurrent.py), and on the per-sample path
through their recurrence written out in elementary ops (fim/rnn_replica.py), exact against a
float64 per-sample loop in every covered configuration, with no one-sample-at-a-time loop; the
replica equals the fused op."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast
from fisher_fast.fim import rules
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


def _exact_without_a_per_sample_loop(model: nn.Module, data: list, **options: object) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleLoopWarning)
        fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, **options)
    reference = reference_fim_batches(model, data)
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-10, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"
    rnn_names = [n for n in fim.names if n.startswith("rnn.")]
    assert rnn_names and all(float(reference[n].abs().max()) > 0 for n in rnn_names)
    return fim.meta["paths"]


def _data(batches: int = 2) -> list:
    return [
        (torch.randn(N, T, FEATURES, dtype=torch.float64), torch.randint(0, 3, (N,)))
        for _ in range(batches)
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", ["rule", "per-sample"])
def test_recurrent_layers_are_exact_and_batched(
    name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = Classifier(*CONFIGS[name]).double().eval()
    if path == "per-sample":  # the module without its rule: the replica under vmap
        monkeypatch.delitem(rules._RULES, type(model.rnn))
    paths = _exact_without_a_per_sample_loop(model, _data())
    rnn_paths = {p for n, p in paths.items() if n.startswith("rnn.")}
    want = "rule recurrent_rule" if path == "rule" else "per-sample gradients of 'rnn' (%s)"
    assert rnn_paths == {want.replace("%s", type(model.rnn).__name__)}, rnn_paths


class _TwoSequences(nn.Module):
    """One GRU read twice (the second time on the reversed sequence, from the first call's
    final state): its per-sample gradient is the sum over both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, h = self.rnn(x)
        second, _ = self.rnn(x.flip(1), h)
        return self.head(torch.cat([first[:, -1], second[:, -1]], dim=1))


def test_a_recurrent_layer_called_twice_sums_its_calls() -> None:
    torch.manual_seed(random.randrange(2**31))
    paths = _exact_without_a_per_sample_loop(_TwoSequences().double().eval(), _data())
    assert paths["rnn.weight_hh_l0"] == "rule recurrent_rule"


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_the_rule_agrees_with_the_per_sample_path_on_every_pass(
    fisher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The true Fisher kinds run one backward pass per class or draw over one forward pass;
    the rule's kept states serve them all (compared with the replica under vmap)."""
    torch.manual_seed(random.randrange(2**31))
    model, data = _TwoSequences().double().eval(), _data()
    seed = random.randrange(2**31)

    def fim() -> fisher_fast.DiagFIM:
        generator = torch.Generator().manual_seed(seed)
        return fisher_fast.diag_fim(
            model, data, fisher=fisher, mc_samples=3, generator=generator,
            progress=False, dtype=torch.float64,
        )  # fmt: skip

    by_rule = fim()
    assert by_rule.meta["paths"]["rnn.weight_ih_l0"] == "rule recurrent_rule"
    monkeypatch.delitem(rules._RULES, nn.GRU)
    per_sample = fim()
    assert by_rule.meta["paths"]["rnn.weight_ih_l0"] != per_sample.meta["paths"]["rnn.weight_ih_l0"]
    scale = float(per_sample.flat.abs().max())
    assert scale > 0 and float((by_rule.flat - per_sample.flat).abs().max()) <= 1e-10 * scale


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
