"""A short end-to-end demonstration on embedded data: task distances between digits tasks.

Tasks (the paper's MNIST tasks, §4.1, on scikit-learn's 8x8 digits): 0 = detect digit 0,
1 = detect digit 6, 2 = {0, 1, 2, 3, anything else}, 3 = all ten digits. Every probe is the
same MLP with a 10-way head; task labels are the first classes of that head. Binary tasks are
balanced (all positives, an equal number of random negatives); "anything else" is subsampled to
the size of one named class. The distance d[a, b] compares the FIM of the network trained on a
with that of the network trained on b, both on b's test split, with the exact Fisher (each
network's own predictive distribution, so label meanings need not agree between tasks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fisher_fast

HEAD = 10
TASK_NAMES = ("detect 0", "detect 6", "0-3 + other", "all digits")


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def _task(x: torch.Tensor, y: torch.Tensor, task: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and task labels of one task, balanced as in the paper."""
    if task in (0, 1):
        digit = 0 if task == 0 else 6
        pos = (y == digit).nonzero().squeeze(1)
        neg = (y != digit).nonzero().squeeze(1)
        neg = neg[torch.randperm(len(neg), generator=g)[: len(pos)]]
        idx = torch.cat([pos, neg])
        return x[idx], (y[idx] == digit).long()
    if task == 2:
        named = (y <= 3).nonzero().squeeze(1)
        other = (y > 3).nonzero().squeeze(1)
        other = other[torch.randperm(len(other), generator=g)[: int((y == 0).sum())]]
        idx = torch.cat([named, other])
        return x[idx], torch.where(y[idx] <= 3, y[idx], torch.tensor(4))
    return x, y


def _split(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    order = torch.randperm(len(y), generator=g)
    cut = int(0.7 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _probe(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, HEAD))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, g: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def run_demo(seed: int = 0, epochs: int = 30, progress: bool = True) -> torch.Tensor:
    """Train the four probes, print accuracies and the distance matrix; return the matrix."""
    print("fisher_fast", fisher_fast.__version__, fisher_fast.build_info() if fisher_fast.is_loaded() else "(no compiled library)")
    g = torch.Generator().manual_seed(seed)
    x, y = _load_digits()
    tasks = [_split(*_task(x, y, t, g), g) for t in range(4)]
    probes = []
    for t, ((xtr, ytr), (xte, yte)) in enumerate(tasks):
        model = _probe(seed + t)
        _train(model, xtr, ytr, epochs, g)
        with torch.no_grad():
            accuracy = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"task {t} ({TASK_NAMES[t]}): {len(ytr)} train / {len(yte)} test samples, test accuracy {accuracy:.3f}")
        probes.append(model)
    distance = torch.zeros(4, 4, dtype=torch.float64)
    for b, (_, (xte, _)) in enumerate(tasks):
        fims = [fisher_fast.diag_fim(p, xte, fisher="exact", progress=progress) for p in probes]
        distance[:, b] = fisher_fast.frechet_distances(fims[b], fims)
    print("Fréchet task distance d[source, target] (rows: source, columns: target):")
    print("        " + "".join(f"{t:>8d}" for t in range(4)))
    for a in range(4):
        print(f"{a:>8d}" + "".join(f"{float(distance[a, b]):8.4f}" for b in range(4)))
    return distance
