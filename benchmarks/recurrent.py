"""nn.LSTM and nn.GRU: diag_fim through the unrolled recurrence (fim/rnn_replica.py) against the
fused op on the same per-sample path, and against the floor, interleaved.

Before the replica, the per-sample path ran the fused op under vmap, which has no batching rule
for it (vmap loops inside, or fails where the layer's state has its samples on axis 1, and the
path drops to one sample at a time). ``fused`` reproduces that by turning the replica off.
Every round times each method once; medians over rounds.

    python benchmarks/recurrent.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import fisher_fast
from fisher_fast.fim import fallback

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


def methods(model: nn.Module, data: list) -> dict[str, Callable[[], object]]:
    params = list(model.parameters())
    replica = fallback.replica

    def floor() -> None:
        for x, y in data:
            torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)

    def unrolled() -> object:
        return fisher_fast.diag_fim(model, data, progress=False)

    def fused() -> object:
        fallback.replica = lambda *args: None  # type: ignore[assignment]
        try:
            return fisher_fast.diag_fim(model, data, progress=False)
        finally:
            fallback.replica = replica

    return {"floor": floor, "unrolled": unrolled, "fused": fused}


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
    print("| layer | floor (ms) | unrolled | fused (before) | unrolled vs fused |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for cell, batch_first in ((nn.LSTM, True), (nn.GRU, False)):
        model = Classifier(cell, batch_first).eval()
        run = methods(model, data)
        a, b = run["unrolled"](), run["fused"]()
        diff = float((a.flat - b.flat).abs().max() / b.flat.abs().max())  # type: ignore[attr-defined]
        assert diff < 1e-5, diff  # the same numbers, to float32 rounding
        times: dict[str, list[float]] = {k: [] for k in run}
        for _ in range(args.rounds):
            for name, fn in run.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        layout = "batch-first" if batch_first else "sequence-first"
        print(
            f"| {cell.__name__} ({layout}) | {ms['floor']:.1f} | {ms['unrolled'] / ms['floor']:.2f}× "
            f"| {ms['fused'] / ms['floor']:.2f}× | {ms['fused'] / ms['unrolled']:.1f}× faster |"
        )


if __name__ == "__main__":
    main()
