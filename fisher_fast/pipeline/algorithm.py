"""Algorithm 1 of the paper: task-aware architecture search for a new target task.

1. Train the target's probe (the dictionary's architecture and schedule).
2. Fréchet distance from every baseline to the target: each baseline probe's FIM and the
   target probe's FIM on the same target inputs (Definition 4, the dictionary's Fisher kind).
3. ``a* = argmin`` distance; the search space ``S_{a*}`` restricted to a*'s best cell.
4. FUSE in ``S_{a*}`` on the target's training split (its validation part carved from it).
5. Train the found cell once more from scratch and evaluate it once on the test split.

a*'s structure may admit a single cell (one live edge, one operation); that cell is then the
answer without a search (no rounds, no steps).

The test split serves step 5 only. The distances use the target's validation split by default
(``distance_split``; the paper's Definition 4 uses test data, which a search must not look at).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisher_fast.distance import frechet_distances
from fisher_fast.distributed import is_main, on_main
from fisher_fast.nas import (
    Evaluation,
    FuseConfig,
    SearchResult,
    SearchSpace,
    fuse_search,
    train_and_evaluate,
)
from fisher_fast.pipeline.dictionary import DictionaryError, TaskDictionary
from fisher_fast.tasks.cache import write_json
from fisher_fast.tasks.distances import task_fim
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.threads import probe_threads

DEFAULT_FINAL_STEPS = 400
"""Adam steps of the final training of a found cell (batch size from the FUSE setting)."""


@dataclass(frozen=True)
class ArchitectureReport:
    """What :func:`search_architecture` found and what it cost.

    ``distances`` maps each baseline to its Fréchet distance to the target (in [0, 1]);
    ``closest`` is a*; ``space_size`` the number of cells of ``S_{a*}`` (``full_space_size``
    that of the full space of the same node count); ``search`` the FUSE result; ``evaluation``
    the final training's test accuracy, parameter count and seconds; ``*_seconds`` wall times.
    """

    target: str
    distances: dict[str, float]
    closest: str
    baseline_genotype: str
    space_size: int
    full_space_size: int
    search: SearchResult
    evaluation: Evaluation
    probe_seconds: float
    distance_seconds: float

    @property
    def seconds(self) -> float:
        """Wall time of steps 1-4, the search cost reported in Table 1."""
        return self.probe_seconds + self.distance_seconds + self.search.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "distances": self.distances,
            "closest": self.closest,
            "baseline_genotype": self.baseline_genotype,
            "space_size": self.space_size,
            "full_space_size": self.full_space_size,
            "search": self.search.to_dict(),
            "evaluation": self.evaluation._asdict(),
            "probe_seconds": self.probe_seconds,
            "distance_seconds": self.distance_seconds,
            "search_seconds": self.seconds,
        }


def baseline_distances(
    target: Task, dictionary: TaskDictionary, *, seed: int = 0, split: str = "val"
) -> tuple[dict[str, float], float]:
    """Steps 1-2: ({baseline: distance to ``target``}, seconds spent training the probe).

    A baseline of the target's own name is left out (it would be a* at distance 0 and the
    search would only repeat its own); a dictionary holding nothing else is an error.
    """
    names = candidate_baselines(target, dictionary)
    s = dictionary.settings
    start = time.perf_counter()
    probe = s.train_probe(target, seed)
    probe_seconds = time.perf_counter() - start
    reference = task_fim(probe, target, fisher=s.fisher, seed=seed, split=split)
    others = [
        task_fim(dictionary.load_probe(name), target, fisher=s.fisher, seed=seed, split=split)
        for name in names
    ]
    values = frechet_distances(reference, others).tolist()
    return dict(zip(names, values, strict=True)), probe_seconds


def candidate_baselines(target: Task, dictionary: TaskDictionary) -> list[str]:
    """The baselines a* is chosen from: all but one named like ``target``."""
    names = [n for n in dictionary.names() if n != target.name]
    if names:
        return names
    if len(dictionary) == 0:
        raise DictionaryError(f"the task dictionary in {dictionary.root} has no baseline yet")
    raise DictionaryError(
        f"the task dictionary in {dictionary.root} holds only the target {target.name!r} "
        "itself, so there is no other baseline to compare it with; build a dictionary without "
        "it (`fisher-fast dictionary build --exclude TASK`) or add other baselines"
    )


def closest_baseline(distances: dict[str, float]) -> str:
    """a* = argmin of the distances (ties: the baseline added first)."""
    return min(distances, key=distances.__getitem__)


def search_architecture(
    target: Task,
    dictionary: TaskDictionary,
    *,
    seed: int = 0,
    config: FuseConfig | None = None,
    final_steps: int = DEFAULT_FINAL_STEPS,
    distance_split: str = "val",
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> ArchitectureReport:
    """Run Algorithm 1 for ``target`` against ``dictionary`` (see module doc).

    ``seed`` seeds the target probe and one generator for the search and the final training:
    same seed, same report (on CPU). ``config`` defaults to the dictionary's FUSE setting. With
    ``out``, the FUSE rounds are checkpointed to ``out/fuse.json`` (a rerun resumes them) and
    the report is written to ``out/report.json``.

    Under torch.distributed, rank 0 trains the target probe and measures the distances; the
    search and the final training run data-parallel on every rank
    (:mod:`fisher_fast.nas.parallel`); rank 0 writes the files.
    ``threads``: torch's CPU threads meanwhile (default: 1 for the small probes; see
    :mod:`fisher_fast.tasks.threads`).
    """
    with probe_threads(dictionary.settings.arch, threads):
        config = config or dictionary.settings.fuse
        start = time.perf_counter()
        distances, probe_seconds = on_main(
            "the task distances",
            lambda: baseline_distances(target, dictionary, seed=seed, split=distance_split),
        )
        distance_seconds = time.perf_counter() - start - probe_seconds
        closest = closest_baseline(distances)
        best = dictionary[closest].genotype
        space = SearchSpace.restricted_to(best)
        splits = target.splits()
        generator = torch.Generator().manual_seed(seed)
        folder = None if out is None else Path(out)
        if space.size == 1:  # nothing to choose: the baseline's structure admits one cell
            result = SearchResult(
                next(iter(space)), history=(), alphas=(1.0,), steps=0, seconds=0.0
            )
        else:
            result = fuse_search(
                space,
                splits.train,
                num_classes=target.num_classes,
                generator=generator,
                config=fit_candidates(config, space),
                checkpoint=None if folder is None else folder / "fuse.json",
                progress=progress,
            )
        evaluation = train_and_evaluate(
            result.genotype,
            splits.train,
            splits.test,
            num_classes=target.num_classes,
            steps=final_steps,
            val_data=splits.val,
            generator=generator,
            config=config,
        )
        report = ArchitectureReport(
            target=target.name,
            distances=distances,
            closest=closest,
            baseline_genotype=best.to_string(),
            space_size=space.size,
            full_space_size=SearchSpace.full(best.nodes).size,
            search=result,
            evaluation=evaluation,
            probe_seconds=probe_seconds,
            distance_seconds=distance_seconds,
        )
        if folder is not None and is_main():
            write_json(folder / "report.json", report.to_dict())
        return report


def fit_candidates(config: FuseConfig, space: SearchSpace) -> FuseConfig:
    """``config`` with at most ``space.size - 1`` candidates per round: a round mixes the
    incumbent with distinct other cells, so a small restricted space caps C (at least 1)."""
    return dataclasses.replace(config, candidates=max(1, min(config.candidates, space.size - 1)))
