"""nn.LSTM and nn.GRU: diag_fim by their rule (fim/rules/recurrent.py) and on the per-sample
path, against the floor, interleaved.

``rule``: the default, the gate gradients of the unrolled recurrence and per-sample products
over time. ``unrolled``: the rule removed, the per-sample path with the recurrence written out
(fim/rnn_replica.py) under vmap. ``fused``: the same path running the fused op, which vmap has
no batching rule for (it loops inside, or fails where the layer's state has its samples on
axis 1, and the path drops to one sample at a time), as before the replica. Every round times
each method once; medians over rounds.

    python benchmarks/recurrent.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

import fisher_fast
from fisher_fast.fim import fallback, rules

N, T, FEATURES, HIDDEN, LAYERS, CLASSES, BATCHES = 32, 20, 32, 64, 2, 10, 4


class Classifier(nn.Module):
    """A 2-layer recurrent layer and a linear head on its last hidden state."""

    def __init__(self, cell: type[nn.RNNBase], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


@contextlib.contextmanager
def without_rule(cell: type[nn.Module], fused: bool = False) -> Iterator[None]:
    """diag_fim with ``cell`` on the per-sample path (and the fused op there when ``fused``)."""
    spec, replica = rules._RULES.pop(cell), fallback.replica
    if fused:
        fallback.replica = lambda *args: None
    try:
        yield
    finally:
        rules._RULES[cell], fallback.replica = spec, replica


def methods(model: nn.Module, data: list) -> dict[str, Callable[[], object]]:
    params = list(model.parameters())
    cell = type(model.get_submodule("rnn"))

    def floor() -> None:
        for x, y in data:
            torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)

    def rule() -> object:
        return fisher_fast.diag_fim(model, data, progress=False)

    def unrolled() -> object:
        with without_rule(cell):
            return fisher_fast.diag_fim(model, data, progress=False)

    def fused() -> object:
        with without_rule(cell, fused=True):
            return fisher_fast.diag_fim(model, data, progress=False)

    return {"floor": floor, "rule": rule, "unrolled": unrolled, "fused": fused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the fused path's vmap and per-sample-loop warnings
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(N, T, FEATURES, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen))
        for _ in range(BATCHES)
    ]
    print(f"N={N}, T={T}, {LAYERS} layers of {HIDDEN}, {BATCHES} batches, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")  # fmt: skip
    print(
        "| layer | floor (ms) | rule | per-sample, unrolled | per-sample, fused | rule vs unrolled |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for cell, batch_first in ((nn.LSTM, True), (nn.GRU, False)):
        model = Classifier(cell, batch_first).eval()
        run = methods(model, data)
        fims = [run[name]() for name in ("rule", "unrolled", "fused")]
        assert fims[0].meta["paths"]["rnn.weight_hh_l0"] == "rule recurrent_rule"  # type: ignore[attr-defined]
        for other in fims[1:]:  # the same numbers, to float32 rounding
            diff = (other.flat - fims[0].flat).abs().max() / fims[0].flat.abs().max()  # type: ignore[attr-defined]
            assert float(diff) < 1e-5, float(diff)
        times: dict[str, list[float]] = {k: [] for k in run}
        for _ in range(args.rounds):
            for name, fn in run.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        layout = "batch-first" if batch_first else "sequence-first"
        ratio = {k: ms[k] / ms["floor"] for k in ("rule", "unrolled", "fused")}
        print(
            f"| {cell.__name__} ({layout}) | {ms['floor']:.1f} | {ratio['rule']:.2f}× "
            f"| {ratio['unrolled']:.2f}× | {ratio['fused']:.2f}× "
            f"| {ms['unrolled'] / ms['rule']:.1f}× faster |"
        )


if __name__ == "__main__":
    main()
