"""The §4.4 study: Fréchet task distances between image-to-image tasks, against a transfer
affinity computed the Taskonomy way, and the rank correlation between the two.

In trial s (seed s) every task gets an autoencoder probe (:mod:`.training`). Then:

* **distance**: d[a, b] of Definition 4, the Fréchet distance between F_{a,b} (probe a's
  diagonal Fisher on task b's test pairs) and F_{b,b}, with the regression Fisher of the
  mean-square error (``"empirical"``, paper eq. 2: the per-sample gradients of
  ½‖f(x) - y‖² with task b's targets; ``"mc"`` and ``"exact"``: the Gaussian model's own
  predictive distribution, Σ_c (∂f_c/∂θ)², without targets);
* **transfer affinity** (Taskonomy's transfer-learning baseline, without its AHP
  normalisation): gain[a, b] = 1 - L(a -> b) / L(scratch -> b), where L(a -> b) is the test
  error on b after fine-tuning a copy of probe a on b for a fixed budget and L(scratch -> b)
  that of a fresh probe trained on b with the same budget. Positive: a's weights help b.

A task is close to another when transfer from it helps, so the paper's claim predicts a
negative rank correlation between d[a, b] and gain[a, b]. :func:`rank_agreement` measures it on
the means over trials: Spearman's ρ over all pairs a ≠ b with a permutation p-value, ρ within
each target's column, and how often both pick the same closest source.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fisher_fast.distance import frechet_distances
from fisher_fast.extras import require_module
from fisher_fast.fim import DiagFIM, diag_fim
from fisher_fast.io import write_json
from fisher_fast.tasks.cache import RunCache, config_key
from fisher_fast.tasks.dense.probe import make_autoencoder
from fisher_fast.tasks.dense.suite import DenseSuite, ImageTask
from fisher_fast.tasks.dense.training import DenseProbe, train_autoencoder, transfer_mse
from fisher_fast.tasks.matrix_result import trial_std
from fisher_fast.tasks.results_guard import refuse_other_settings
from fisher_fast.tasks.threads import probe_threads

DENSE_FISHER = ("empirical", "mc", "exact")
PERMUTATIONS = 10_000
"""Random permutations behind the p-value of the overall rank correlation."""


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (ties get their average rank); NaN when
    either is constant."""
    return _pearson(_ranks(x), _ranks(y)[None, :])[0]


def _pearson(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson correlation of the 1-D ``x`` with each row of ``ys`` (NaN for a constant one)."""
    x = x - x.mean()
    ys = ys - ys.mean(axis=1, keepdims=True)
    norm = np.sqrt((x * x).sum() * (ys * ys).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, ys @ x / norm, np.nan)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_agreement(distance: torch.Tensor, gain: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """How well the (K, K) distance means order sources as the (K, K) transfer gains do.

    Returns plain JSON: ``spearman`` over the K (K - 1) pairs a ≠ b, ``p_value`` (two-sided,
    the share of :data:`PERMUTATIONS` seeded random pairings of the same values whose |ρ| is at
    least as large), ``per_target`` (ρ over the K - 1 sources of each target column),
    ``closest_by_distance`` / ``closest_by_transfer`` (each target's source of smallest distance
    / largest gain) and ``same_closest`` (how many targets the two agree on)."""
    k = distance.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    d, g = distance[off].numpy(), gain[off].numpy()
    rho = spearman(d, g)
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(_ranks(g), (PERMUTATIONS, 1)), axis=1)
    permuted = _pearson(_ranks(d), shuffled)
    p_value = (1 + int((np.abs(permuted) >= abs(rho) - 1e-12).sum())) / (1 + PERMUTATIONS)
    per_target = [
        spearman(distance[off[:, b], b].numpy(), gain[off[:, b], b].numpy()) for b in range(k)
    ]
    masked_d = distance.clone().fill_diagonal_(math.inf)
    masked_g = gain.clone().fill_diagonal_(-math.inf)
    by_distance = [int(a) for a in masked_d.argmin(0)]
    by_transfer = [int(a) for a in masked_g.argmax(0)]
    return {
        "spearman": rho,
        "p_value": p_value,
        "pairs": int(off.sum()),
        "per_target": per_target,
        "closest_by_distance": by_distance,
        "closest_by_transfer": by_transfer,
        "same_closest": sum(a == b for a, b in zip(by_distance, by_transfer, strict=True)),
    }


@dataclass
class DenseStudyResult:
    """Every trial's distances and transfer results; rows are source tasks, columns targets."""

    tasks: list[str]
    descriptions: list[str]
    fisher: str
    seeds: list[int]
    distance: torch.Tensor
    """(S, K, K) float64 d[a, b] per trial."""
    test_r2: torch.Tensor
    """(S, K) float64 test R² of each probe."""
    transfer: torch.Tensor
    """(S, K, K) float64 test MSE on b after fine-tuning probe a on b."""
    scratch: torch.Tensor
    """(S, K) float64 test MSE on b after training from scratch with the same budget."""
    epsilon: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> torch.Tensor:
        """(S, K, K) transfer gain 1 - transfer / scratch per trial."""
        return 1.0 - self.transfer / self.scratch[:, None, :]

    @property
    def distance_mean(self) -> torch.Tensor:
        """(K, K) mean distance over trials."""
        return self.distance.mean(0)

    @property
    def distance_std(self) -> torch.Tensor:
        """(K, K) sample standard deviation of the distance over trials (0 for one trial)."""
        return trial_std(self.distance)

    @property
    def gain_mean(self) -> torch.Tensor:
        """(K, K) mean transfer gain over trials."""
        return self.gain.mean(0)

    def agreement(self) -> dict[str, Any]:
        """:func:`rank_agreement` of the means over trials."""
        return rank_agreement(self.distance_mean, self.gain_mean)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: means, standard deviations, raw values, scores and the rank agreement."""
        return {
            "tasks": self.tasks,
            "descriptions": self.descriptions,
            "fisher": self.fisher,
            "seeds": self.seeds,
            "rows": "source task",
            "columns": "target task",
            "distance_mean": self.distance_mean.tolist(),
            "distance_std": self.distance_std.tolist(),
            "distance": self.distance.tolist(),
            "transfer_gain_mean": self.gain_mean.tolist(),
            "transfer_gain_std": trial_std(self.gain).tolist(),
            "transfer_test_mse": self.transfer.tolist(),
            "scratch_test_mse": self.scratch.tolist(),
            "test_r2": self.test_r2.tolist(),
            "epsilon": self.epsilon,
            "agreement": self.agreement(),
            "config": self.config,
        }


def dense_study(
    suite: DenseSuite,
    *,
    seeds: int | list[int] = 5,
    fisher: str = "empirical",
    mc_samples: int = 1,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
    threads: int | None = 1,
    overwrite: bool = False,
) -> DenseStudyResult:
    """Run the study of the module doc on ``suite`` over seeded trials.

    Args:
        seeds: the number of trials (seeds 0..n-1) or the seeds themselves.
        fisher: the regression Fisher kind, "empirical" (default, the paper's), "mc" or
            "exact" (one backward pass per output value: C H W per batch, slow).
        out: run directory. Trained probes are cached in ``out/probes`` and every finished
            trial in ``out/trials`` (a rerun or a resumed run recomputes nothing done);
            ``dense-<fisher>.json`` and the figures ``dense-<fisher>.png`` (mean, standard
            deviation, transfer gain) and ``dense-<fisher>-ranks.png`` (distance against gain
            per target) are written at the end. A results file of other settings is an error
            before any work, unless ``overwrite``.
        threads: torch's CPU threads during the run (default 1: these small probes gain
            nothing from more; None keeps torch's setting).
    """
    if fisher not in DENSE_FISHER:
        raise ValueError(f"fisher must be one of {', '.join(DENSE_FISHER)}, got {fisher!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds is empty: pass a positive number of trials or a list of seeds")
    settings = {
        "suite": suite.name,
        "data": suite.fingerprint(),
        "train": suite.train.to_dict(),
        "transfer_epochs": suite.transfer_epochs,
        "epsilon": suite.epsilon,
        "fisher": fisher,
        "mc_samples": mc_samples if fisher == "mc" else None,
    }
    if out is not None:
        require_module("matplotlib", f"the figures dense-{fisher}.png of the run directory")
        if not overwrite:
            refuse_other_settings(Path(out) / f"dense-{fisher}.json", settings)
    cache = RunCache(out) if out is not None else None
    k = len(suite.tasks)
    start = time.perf_counter()
    trials = []
    with (
        probe_threads("autoencoder", threads),
        tqdm(
            total=len(seed_list) * trial_steps(k),
            desc=f"{suite.name} {fisher}",
            unit="step",
            disable=not progress,
        ) as bar,
    ):
        for seed in seed_list:
            trials.append(_trial(suite, seed, settings, cache, device, batch_size, bar))
    result = DenseStudyResult(
        [t.name for t in suite.tasks],
        [t.description for t in suite.tasks],
        fisher,
        seed_list,
        torch.stack([t["distance"] for t in trials]),
        torch.stack([t["test_r2"] for t in trials]),
        torch.stack([t["transfer"] for t in trials]),
        torch.stack([t["scratch"] for t in trials]),
        suite.epsilon,
        config={**settings, "seconds": round(time.perf_counter() - start, 2)},
    )
    if out is not None:
        from fisher_fast.tasks.dense.report import save_dense_result

        save_dense_result(result, Path(out))
    return result


def trial_steps(k: int) -> int:
    """Progress steps of one trial of k tasks: k probes, k² FIMs, k (k + 1) fine-tunings."""
    return k + k * k + k * (k + 1)


def _trial(
    suite: DenseSuite,
    seed: int,
    settings: dict[str, Any],
    cache: RunCache | None,
    device: str | torch.device,
    batch_size: int,
    bar: tqdm[Any],
) -> dict[str, torch.Tensor]:
    """One trial's distances, probe scores and transfer errors, from ``cache`` when it holds
    them (``out/trials/seed<s>-<key>.json``), else computed and saved there."""
    key = config_key({"kind": "dense-trial", "seed": seed, **settings})
    path = None if cache is None else cache.root / "trials" / f"seed{seed}-{key[:16]}.json"
    k = len(suite.tasks)
    saved = _load_trial(path, key)
    if saved is not None:
        bar.update(trial_steps(k))
        return saved
    probes = [_probe(suite, task, seed, cache, device) for task in suite.tasks]
    bar.update(k)
    distance = torch.zeros(k, k, dtype=torch.float64)
    for b, target in enumerate(suite.tasks):
        fims = [_fim(p.model, suite, target, settings, seed, batch_size) for p in probes]
        bar.update(k)
        distance[:, b] = frechet_distances(fims[b], fims).cpu()
    scratch = torch.zeros(k, dtype=torch.float64)
    transfer = torch.zeros(k, k, dtype=torch.float64)
    for b, target in enumerate(suite.tasks):
        scratch[b] = transfer_mse(suite, target, seed, None, device)
        bar.update(1)
        for a, source in enumerate(probes):
            transfer[a, b] = transfer_mse(suite, target, seed, source.model, device)
            bar.update(1)
    trial = {
        "distance": distance,
        "test_r2": torch.tensor([p.test.r2 for p in probes], dtype=torch.float64),
        "transfer": transfer,
        "scratch": scratch,
    }
    if path is not None:
        write_json(path, {"key": key, **{name: t.tolist() for name, t in trial.items()}})
    return trial


def _load_trial(path: Path | None, key: str) -> dict[str, torch.Tensor] | None:
    """A saved trial whose key matches, or None (missing, unreadable or foreign: recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        return {
            name: torch.tensor(saved[name], dtype=torch.float64)
            for name in ("distance", "test_r2", "transfer", "scratch")
        }
    except (ValueError, KeyError, TypeError) as exc:
        RunCache.reject(path, f"unreadable ({type(exc).__name__}: {exc})")
        return None


def _probe(
    suite: DenseSuite,
    task: ImageTask,
    seed: int,
    cache: RunCache | None,
    device: str | torch.device,
) -> DenseProbe:
    """``task``'s probe in trial ``seed``: from the cache when valid, else trained (and cached)."""
    if cache is None:
        return train_autoencoder(suite, task, seed, device)
    key = config_key(
        {
            "kind": "dense-probe",
            "data": suite.fingerprint(),
            "task": task.name,
            "seed": seed,
            "train": suite.train.to_dict(),
            "epsilon": suite.epsilon,
        }
    )
    path = cache.probe_path(f"{task.slug}-autoencoder-seed{seed}", key)
    loaded = cache.load_state(path, key)
    if loaded is not None:
        state, meta, _ = loaded
        model = make_autoencoder(suite.image_shape())
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            cache.reject(path, f"its weights do not fit the autoencoder ({exc})")
        else:
            return DenseProbe.from_metadata(model.to(device).eval(), meta)
    probe = train_autoencoder(suite, task, seed, device)
    cache.save_state(path, key, probe.model.state_dict(), probe.metadata())
    return probe


def _fim(
    model: torch.nn.Module,
    suite: DenseSuite,
    target: ImageTask,
    settings: dict[str, Any],
    seed: int,
    batch_size: int,
) -> DiagFIM:
    """The regression Fisher of ``model`` on ``target``'s test pairs."""
    device = next(model.parameters()).device
    test = suite.splits(target).test
    fisher = settings["fisher"]
    return diag_fim(
        model,
        (test.x.to(device), test.y.to(device) if fisher == "empirical" else None),
        loss="mse",
        fisher=fisher,
        mc_samples=settings["mc_samples"] or 1,
        generator=torch.Generator(device).manual_seed(seed) if fisher == "mc" else None,
        batch_size=batch_size,
        progress=False,
        distributed=False,
    )
