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
negative rank correlation between d[a, b] and gain[a, b].
:func:`~fisher_fast.tasks.dense.ranks.rank_agreement` measures it on the means over trials: Spearman's ρ over all pairs a ≠ b with a permutation p-value, ρ within
each target's column, and how often both pick the same closest source. The result type is
:class:`~fisher_fast.tasks.dense.study_result.DenseStudyResult`; with a run directory it is
written there by :func:`~fisher_fast.tasks.dense.report.save_dense_result`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fisher_fast.distance import frechet_distances
from fisher_fast.extras import require_module
from fisher_fast.fim import DiagFIM, diag_fim
from fisher_fast.io import write_json
from fisher_fast.tasks.cache import RunCache, config_key
from fisher_fast.tasks.dense import training as dense_training
from fisher_fast.tasks.dense.probe import make_autoencoder
from fisher_fast.tasks.dense.report import save_dense_result
from fisher_fast.tasks.dense.study_result import DenseStudyResult
from fisher_fast.tasks.dense.suite import DenseSuite, ImageTask
from fisher_fast.tasks.dense.training import DenseProbe
from fisher_fast.tasks.results_guard import refuse_other_settings
from fisher_fast.tasks.threads import probe_threads

DENSE_FISHER = ("empirical", "mc", "exact")


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
        scratch[b] = dense_training.transfer_mse(suite, target, seed, None, device)
        bar.update(1)
        for a, source in enumerate(probes):
            transfer[a, b] = dense_training.transfer_mse(suite, target, seed, source.model, device)
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
        return dense_training.train_autoencoder(suite, task, seed, device)
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
    probe = dense_training.train_autoencoder(suite, task, seed, device)
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
