"""The K x K task distance matrix over seeded trials (paper Definition 4, Figures 2-6): checks
the inputs, deals the jobs of every trial to the ranks (:mod:`.job_schedule`), runs each trial
(:mod:`.matrix_trial`, probes and FIMs got or computed by :mod:`.run_store`) and assembles the
:class:`~fisher_fast.tasks.matrix_result.DistanceResult`; with a run directory the result is
written there by :func:`~fisher_fast.tasks.report.save_result`.

The distance of one pair is :func:`~fisher_fast.tasks.task_fisher.task_distance`; which labels
each Fisher kind uses is set out in :mod:`fisher_fast.tasks.fisher_kinds`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fisher_fast.distributed import is_main, on_main, rank, world_size
from fisher_fast.extras import require_module
from fisher_fast.tasks.cache import RunCache
from fisher_fast.tasks.job_schedule import jobs_of_rank, tasks_of_rank
from fisher_fast.tasks.matrix_result import DistanceResult
from fisher_fast.tasks.matrix_trial import trial_columns, trial_probes
from fisher_fast.tasks.report import save_result
from fisher_fast.tasks.results_guard import refuse_other_settings
from fisher_fast.tasks.run_store import RunStore
from fisher_fast.tasks.suites import Suite, check_shared_splits
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.task_fisher import FimSettings
from fisher_fast.tasks.threads import probe_threads
from fisher_fast.tasks.train import ProbeRecipe, TrainConfig


def distance_matrix(
    suite_or_tasks: Suite | Sequence[Task],
    arch: str,
    *,
    seeds: int | Sequence[int] = 5,
    fisher: str = "exact",
    mc_samples: int = 1,
    epsilon: float | None = None,
    train: TrainConfig | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
    threads: int | None = None,
    overwrite: bool = False,
) -> DistanceResult:
    """The K x K task distance matrix d[a, b] over seeded trials (paper Figures 2-6).

    In trial s every task gets a probe ``arch`` trained with seed s (one head width for the
    whole suite: task label k -> head unit k); then each probe's FIM is computed on each task's
    test split and d[a, b] = Fréchet distance of F_{a,b} and F_{b,b} (see
    :mod:`fisher_fast.tasks.fisher_kinds` for which labels each ``fisher`` kind uses).

    Args:
        suite_or_tasks: a :class:`Suite` (its training settings and ε are the defaults) or a
            list of tasks with unique names.
        seeds: the number of trials (seeds 0..n-1) or the seeds themselves.
        fisher: "exact" (default), "mc" or "empirical".
        epsilon, train: override the suite's ε and training settings.
        out: run directory: trained probes and FIMs are cached there (a rerun reuses every valid
            file and recomputes nothing else), and at the end the result is written there by
            :func:`~fisher_fast.tasks.report.save_result` (results-<fisher>.json and
            distance-<fisher>.png). None: nothing is written. A results-<fisher>.json of other
            settings (probe, ε, training, Monte Carlo samples or tasks) already there is an
            error before any work, unless ``overwrite``.
        batch_size: samples per FIM batch.
        threads: torch's CPU threads during the run (restored afterwards); default 1 for the
            small probes, which gain nothing from threads and lose much when the cores are shared, and torch's own
            setting for the others (see :mod:`fisher_fast.tasks.threads`).

    Inside an initialised torch.distributed process group (e.g. under torchrun, see
    docs/distributed.md) every rank calls this with the same arguments and the work is dealt
    out round-robin: job ``s * K + a`` of trial ``s`` (training task a's probe, then the FIMs and
    distances of target column a) goes to rank ``(s * K + a) % world_size``. Trained probes are
    exchanged as weights, columns as distances (``all_gather_object``); each rank caches what
    it computed in ``out`` (same keys and files as a single process, so either kind of run
    reuses the other's cache), rank 0 writes the JSON and figure, and every rank returns the
    same values as a single process would. An error on any rank is raised on every rank as a
    :class:`fisher_fast.distributed.RankError` naming it.
    """
    with probe_threads(arch, threads):
        tasks, default_train, default_epsilon = _unpack(suite_or_tasks)
        if out is not None:
            require_module("matplotlib", f"the figure distance-{fisher}.png of the run directory")
        seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
        if not seed_list:
            raise ValueError("seeds is empty: pass a positive number of trials or a list of seeds")
        store = RunStore(
            ProbeRecipe(
                arch=arch,
                head_width=max(t.num_classes for t in tasks),
                epsilon=default_epsilon if epsilon is None else epsilon,
                train=train or default_train,
            ),
            FimSettings(fisher, mc_samples, batch_size),
            device,
            RunCache(out) if out is not None else None,
        )
        settings = settings_of(store.recipe, mc_samples, tasks)
        if out is not None and not overwrite:
            refuse_other_settings(Path(out) / f"results-{fisher}.json", settings)
        start = time.perf_counter()
        values, accuracy = _run_trials(store, tasks, seed_list, progress)
        result = DistanceResult(
            tasks=[t.name for t in tasks],
            arch=arch,
            fisher=fisher,
            seeds=seed_list,
            values=values,
            test_accuracy=accuracy,
            epsilon=store.recipe.epsilon,
            head_width=store.recipe.head_width,
            config={
                **settings,
                "seconds": round(time.perf_counter() - start, 2),
                "processes": world_size(),
            },
        )
        if out is not None:
            # Written once, by rank 0; the exchange is also the final barrier (no rank returns
            # before the files exist) and reports a failure to write on every rank.
            on_main("writing the results", lambda: save_result(result, Path(out)))
        return result


def settings_of(recipe: ProbeRecipe, mc_samples: int, tasks: Sequence[Task]) -> dict[str, Any]:
    """What a matrix's values depend on besides the seeds, as plain JSON: recorded with the
    results and compared with them before a rerun in the same directory replaces them."""
    return {
        "arch": recipe.arch,
        "epsilon": recipe.epsilon,
        "train": recipe.train.to_dict(),
        "mc_samples": mc_samples,
        "tasks": [t.fingerprint() for t in tasks],
    }


def _run_trials(
    store: RunStore, tasks: list[Task], seeds: list[int], progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every trial's (S, K, K) distances and (S, K) probe test accuracies, this rank running
    the jobs the schedule deals it (a probe and a column each) and receiving the others'."""
    k = len(tasks)
    values = torch.zeros(len(seeds), k, k, dtype=torch.float64)
    accuracy = torch.zeros(len(seeds), k, dtype=torch.float64)
    with tqdm(
        total=jobs_of_rank(len(seeds), k, rank(), world_size()) * (1 + k),
        desc=f"{store.recipe.arch} {store.fims.fisher}",
        unit="step",
        disable=not (progress and is_main()),
    ) as bar:
        for i, seed in enumerate(seeds):
            ours = tasks_of_rank(i, k, rank(), world_size())
            probes = trial_probes(store, tasks, seed, ours, bar)
            for a, keyed in enumerate(probes):
                accuracy[i, a] = keyed.probe.test_accuracy
            for b, column in trial_columns(store, tasks, seed, probes, ours, bar).items():
                values[i, :, b] = column
    return values, accuracy


def _unpack(suite_or_tasks: Suite | Sequence[Task]) -> tuple[list[Task], TrainConfig, float]:
    """The tasks, default training settings and default ε of a suite (or of a list of tasks,
    with :class:`TrainConfig`'s defaults and ε = 0.1), checked: at least two tasks, unique
    names, and tasks of one source split it alike (else their splits overlap)."""
    if isinstance(suite_or_tasks, Suite):
        tasks, train, epsilon = (
            list(suite_or_tasks.tasks),
            suite_or_tasks.train,
            suite_or_tasks.epsilon,
        )
    else:
        tasks, train, epsilon = list(suite_or_tasks), TrainConfig(), 0.1
    if len(tasks) < 2:
        raise ValueError(f"a distance matrix needs at least two tasks, got {len(tasks)}")
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"task names must be unique (they label rows, columns and cache files); repeated: {duplicates}"
        )
    check_shared_splits(tasks)
    return tasks, train, epsilon
