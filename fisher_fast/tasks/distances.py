"""Fréchet task distances (paper Definition 4) and the K x K matrix over seeded trials.

d[a, b] compares F_{a,b}, the diagonal FIM of the probe trained on task a evaluated on task b's
test split, with F_{b,b}, that of the probe trained on b on the same data: the Fréchet distance
of the unit-trace diagonals (eq. 4), in [0, 1]; it is asymmetric because the data are b's.

Which labels each Fisher kind uses is set out in :mod:`fisher_fast.tasks.matrix`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fisher_fast.distance import frechet_distance, frechet_distances
from fisher_fast.distributed import all_outcomes, is_main, my_share, world_size
from fisher_fast.extras import require_module
from fisher_fast.fim import DiagFIM, diag_fim
from fisher_fast.tasks.cache import RunCache, config_key
from fisher_fast.tasks.matrix import LABEL_CONVENTIONS, DistanceResult
from fisher_fast.tasks.probes import make_probe
from fisher_fast.tasks.report import refuse_other_settings, save_result
from fisher_fast.tasks.suites import Suite, check_shared_splits
from fisher_fast.tasks.task import Task, TaskSplits
from fisher_fast.tasks.threads import probe_threads
from fisher_fast.tasks.train import Probe, TrainConfig, train_probe, warn_if_not_reached


def task_fim(
    probe: Probe | nn.Module,
    task: Task,
    *,
    fisher: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    split: str = "test",
) -> DiagFIM:
    """Diagonal FIM of ``probe`` on ``task``'s test split (labels per ``fisher``, see module doc).

    ``seed`` seeds the label draws of the "mc" kind. ``split`` names the split the FIM is
    computed on: ``"test"`` (Definition 4) or ``"val"`` / ``"train"`` (a search that must keep
    the test split for its final evaluation). The FIM lives where the model does.
    """
    _check_fisher(fisher)
    if split not in TaskSplits._fields:
        raise ValueError(f"split must be one of {', '.join(TaskSplits._fields)}, got {split!r}")
    model = probe.model if isinstance(probe, Probe) else probe
    device = next(model.parameters()).device
    part = getattr(task.splits(), split)
    labels = part.y.to(device) if fisher == "empirical" else None
    generator = torch.Generator(device).manual_seed(seed) if fisher == "mc" else None
    return diag_fim(
        model,
        (part.x.to(device), labels),
        fisher=fisher,
        mc_samples=mc_samples,
        generator=generator,
        batch_size=batch_size,
        progress=False,
        distributed=False,
    )


def task_distance(
    source_probe: Probe | nn.Module,
    target_probe: Probe | nn.Module,
    target_task: Task,
    *,
    fisher: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """d[a, b] of Definition 4: the Fréchet distance between the source probe's FIM and the
    target probe's FIM, both on ``target_task``'s test split. The probes must share one
    architecture (Definition 3). Returns a float in [0, 1]; 0 means identical FIMs."""
    source = task_fim(
        source_probe,
        target_task,
        fisher=fisher,
        mc_samples=mc_samples,
        seed=seed,
        batch_size=batch_size,
    )
    target = task_fim(
        target_probe,
        target_task,
        fisher=fisher,
        mc_samples=mc_samples,
        seed=seed,
        batch_size=batch_size,
    )
    _check_same_structure(source, target)
    return float(frechet_distance(target, source))


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
    test split and d[a, b] = Fréchet distance of F_{a,b} and F_{b,b} (see the module doc for
    which labels each ``fisher`` kind uses).

    Args:
        suite_or_tasks: a :class:`Suite` (its training settings and ε are the defaults) or a
            list of tasks with unique names.
        seeds: the number of trials (seeds 0..n-1) or the seeds themselves.
        fisher: "exact" (default), "mc" or "empirical".
        epsilon, train: override the suite's ε and training settings.
        out: run directory: trained probes and FIMs are cached there (a rerun reuses every valid
            file and recomputes nothing else), and results-<fisher>.json and
            distance-<fisher>.png are written there. None: nothing is written. A
            results-<fisher>.json of other settings (probe, ε, training, Monte Carlo samples
            or tasks) already there is an error before any work, unless ``overwrite``.
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
        run = _Run(
            tasks,
            arch,
            fisher=fisher,
            mc_samples=mc_samples,
            train=train or default_train,
            epsilon=default_epsilon if epsilon is None else epsilon,
            device=device,
            batch_size=batch_size,
            cache=RunCache(out) if out is not None else None,
        )
        settings = settings_of(run, arch, mc_samples, tasks)
        if out is not None and not overwrite:
            refuse_other_settings(Path(out) / f"results-{fisher}.json", settings)
        start = time.perf_counter()
        k = len(tasks)
        values = torch.zeros(len(seed_list), k, k, dtype=torch.float64)
        accuracy = torch.zeros(len(seed_list), k, dtype=torch.float64)
        mine = set(my_share(range(len(seed_list) * k)))  # job i*k + a: probe a, then column a
        with tqdm(
            total=len(mine) * (1 + k),
            desc=f"{arch} {fisher}",
            unit="step",
            disable=not (progress and is_main()),
        ) as bar:
            for i, seed in enumerate(seed_list):
                ours = [a for a in range(k) if i * k + a in mine]
                probes = run.probes(tasks, seed, ours, bar)
                for a, (probe, _) in enumerate(probes):
                    accuracy[i, a] = probe.test_accuracy
                for b, column in run.columns(tasks, seed, probes, ours, bar).items():
                    values[i, :, b] = column
        result = DistanceResult(
            [t.name for t in tasks],
            arch,
            fisher,
            seed_list,
            values,
            accuracy,
            run.epsilon,
            run.head_width,
            config={
                **settings,
                "seconds": round(time.perf_counter() - start, 2),
                "processes": world_size(),
            },
        )
        if out is not None:
            directory = Path(out)

            def write() -> None:
                if is_main():
                    save_result(result, directory)

            # Written once, by rank 0; the exchange is also the final barrier (no rank returns
            # before the files exist) and reports a failure to write on every rank.
            all_outcomes("writing the results", write)
        return result


def settings_of(run: _Run, arch: str, mc_samples: int, tasks: Sequence[Task]) -> dict[str, Any]:
    """What a matrix's values depend on besides the seeds, as plain JSON: recorded with the
    results and compared with them before a rerun in the same directory replaces them."""
    return {
        "arch": arch,
        "epsilon": run.epsilon,
        "train": run.train.to_dict(),
        "mc_samples": mc_samples,
        "tasks": [t.fingerprint() for t in tasks],
    }


class _Run:
    """One matrix computation: probes and FIMs from the cache, or computed and cached."""

    def __init__(
        self,
        tasks: list[Task],
        arch: str,
        *,
        fisher: str,
        mc_samples: int,
        train: TrainConfig,
        epsilon: float,
        device: str | torch.device,
        batch_size: int,
        cache: RunCache | None,
    ) -> None:
        _check_fisher(fisher)
        self.arch, self.fisher, self.mc_samples, self.train = arch, fisher, mc_samples, train
        self.epsilon, self.device, self.batch_size, self.cache = epsilon, device, batch_size, cache
        self.head_width = max(t.num_classes for t in tasks)

    def probes(
        self, tasks: list[Task], seed: int, ours: list[int], bar: tqdm[Any]
    ) -> list[tuple[Probe, str]]:
        """Every task's probe in trial ``seed`` (see :meth:`probe`), in task order. This rank
        trains or loads those of the task indices ``ours``; the other ranks' probes arrive as
        weights and metadata through the process group."""
        done: dict[int, tuple[Probe, str]] = {}

        def work() -> list[tuple[int, dict[str, torch.Tensor], dict[str, Any], str]]:
            for a in ours:
                done[a] = self.probe(tasks[a], seed)
                bar.update(1)
            if world_size() == 1:
                return []
            return [
                (a, {n: t.detach().cpu() for n, t in p.model.state_dict().items()}, p.metadata(), d)
                for a, (p, d) in done.items()
            ]

        for shared in all_outcomes(f"training the probes of seed {seed}", work):
            for a, state, meta, digest in shared:
                if a not in done:
                    done[a] = self._rebuild(tasks[a], seed, state, meta), digest
        return [done[a] for a in range(len(tasks))]

    def columns(
        self,
        tasks: list[Task],
        seed: int,
        probes: list[tuple[Probe, str]],
        ours: list[int],
        bar: tqdm[Any],
    ) -> dict[int, torch.Tensor]:
        """Columns d[:, b] of trial ``seed``, (K,) float64 each, for every target b: this rank
        computes (or loads) the FIMs F[a, b] of the targets ``ours``; the other ranks send their
        columns of distances, not their FIMs."""

        def work() -> dict[int, torch.Tensor]:
            columns = {}
            for b in ours:
                fims = []
                for a, source in enumerate(tasks):
                    fims.append(self.fim(probes[a], source, tasks[b], seed))
                    bar.update(1)
                for fim in fims:
                    _check_same_structure(fims[b], fim)
                columns[b] = frechet_distances(fims[b], fims).cpu()
            return columns

        shared = all_outcomes(f"computing the FIMs of seed {seed}", work)
        return {b: column for part in shared for b, column in part.items()}

    def probe(self, task: Task, seed: int) -> tuple[Probe, str]:
        """The probe of ``task`` in trial ``seed`` and the content hash of its weights (part of
        the keys of the FIMs computed from it; empty without a cache)."""
        key = config_key(
            {
                "kind": "probe",
                "task": task.fingerprint(),
                "arch": self.arch,
                "head_width": self.head_width,
                "seed": seed,
                "train": self.train.to_dict(),
            }
        )
        if self.cache is None:
            return self._train(task, seed), ""
        path = self.cache.probe_path(f"{task.slug}-{self.arch}-seed{seed}", key)
        loaded = self.cache.load_state(path, key)
        if loaded is not None:
            state, meta, digest = loaded
            try:
                probe = self._rebuild(task, seed, state, meta)
            except RuntimeError as exc:
                self.cache.reject(path, f"its weights do not fit probe {self.arch!r} ({exc})")
            else:
                warn_if_not_reached(probe)
                return probe, digest
        trained = self._train(task, seed)
        return trained, self.cache.save_state(
            path, key, trained.model.state_dict(), trained.metadata()
        )

    def _rebuild(
        self, task: Task, seed: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Probe:
        """The probe of ``task`` in trial ``seed`` from its weights and :meth:`Probe.metadata`
        (RuntimeError when the weights do not fit the architecture)."""
        model = make_probe(self.arch, tuple(meta["input_shape"]), self.head_width)
        model.load_state_dict(state)
        return Probe(
            model.to(self.device).eval(),
            self.arch,
            task.name,
            seed,
            tuple(meta["input_shape"]),
            self.head_width,
            meta["test_accuracy"],
            meta["val_accuracy"],
            meta["best_epoch"],
            self.epsilon,
            meta["train_seconds"],
        )

    def _train(self, task: Task, seed: int) -> Probe:
        return train_probe(
            task,
            self.arch,
            epsilon=self.epsilon,
            seed=seed,
            config=self.train,
            head_width=self.head_width,
            device=self.device,
        )

    def fim(self, cached: tuple[Probe, str], source: Task, target: Task, seed: int) -> DiagFIM:
        """F[source, target] in trial ``seed``, from the cache or computed and cached."""
        probe, digest = cached

        def compute() -> DiagFIM:
            return task_fim(
                probe,
                target,
                fisher=self.fisher,
                mc_samples=self.mc_samples,
                seed=seed,
                batch_size=self.batch_size,
            )

        if self.cache is None:
            return compute()
        key = config_key(
            {
                "kind": "fim",
                "probe": digest,
                "target": target.fingerprint(),
                "fisher": self.fisher,
                "mc_samples": self.mc_samples if self.fisher == "mc" else None,
                "seed": seed if self.fisher == "mc" else None,
            }
        )
        path = self.cache.fim_path(self.fisher, f"{source.slug}--{target.slug}-seed{seed}", key)
        fim = self.cache.load_fim(path, key)
        if fim is None:
            fim = compute()
            self.cache.save_fim(path, key, fim)
        return fim.to(next(probe.model.parameters()).device)


def _unpack(suite_or_tasks: Suite | Sequence[Task]) -> tuple[list[Task], TrainConfig, float]:
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


def _check_same_structure(a: DiagFIM, b: DiagFIM) -> None:
    if a.names != b.names or a.shapes != b.shapes:
        raise ValueError(
            "the probes differ in architecture (parameter names or shapes), so their FIMs cannot be compared; "
            "Definition 3 needs structurally similar networks: one architecture and one head width for all tasks"
        )


def _check_fisher(fisher: str) -> None:
    if fisher not in LABEL_CONVENTIONS:
        raise ValueError(
            f"fisher must be one of {', '.join(map(repr, LABEL_CONVENTIONS))}, got {fisher!r}"
        )
