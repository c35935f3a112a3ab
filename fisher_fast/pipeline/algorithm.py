"""Algorithm 1 of the paper: task-aware architecture search for a new target task.

1. Train the target's probe (the dictionary's architecture and schedule).
2. Fréchet distance from every baseline to the target: each baseline probe's FIM and the
   target probe's FIM on the same target inputs (Definition 4, the dictionary's Fisher kind).
   The same trained target probe also gives the distances under the other kinds of
   :data:`REPORTED_KINDS` (the paper's empirical Fisher among them), reported for comparison:
   they can name another closest baseline, but only the dictionary's kind decides a*.
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
from fisher_fast.io import write_json
from fisher_fast.nas import (
    Evaluation,
    FuseConfig,
    SearchResult,
    SearchSpace,
    fuse_search,
    train_and_evaluate,
)
from fisher_fast.pipeline.dictionary import DictionaryError, TaskDictionary
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.task_fisher import task_fim
from fisher_fast.tasks.threads import probe_threads

REPORTED_KINDS: tuple[str, ...] = ("exact", "empirical")
"""Fisher kinds whose distances and a* every report holds: the exact true Fisher (the
dictionary's default) and the empirical Fisher of the paper's eq. 2."""

DECIDING_KIND_REASON = {
    "exact": "the exact true Fisher takes labels from the probe's own predictions, so it needs "
    "no target labels and has no Monte Carlo noise",
    "empirical": "the empirical Fisher (paper eq. 2) uses the target's labels, as the paper does",
    "mc": "the Monte Carlo true Fisher samples labels from the probe's own predictions, as the "
    "exact one computes them, at a cost independent of the number of classes",
}
"""Why a dictionary's Fisher kind is a fair choice for a*, one clause per kind."""

DEFAULT_FINAL_STEPS = 400
"""Adam steps of the final training of a found cell (batch size from the FUSE setting)."""


@dataclass(frozen=True)
class ArchitectureReport:
    """What :func:`search_architecture` found and what it cost.

    ``distances`` maps each baseline to its Fréchet distance to the target (in [0, 1]) under
    the dictionary's Fisher kind ``fisher``, the one that decides; ``closest`` is a*;
    ``distances_by_kind`` holds the distances under every kind of :data:`REPORTED_KINDS` and
    ``fisher`` (from the same target probe), ``closest_by_kind`` the a* each would choose;
    ``space_size`` the number of cells of ``S_{a*}`` (``full_space_size``
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
    fisher: str = "exact"
    distances_by_kind: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def closest_by_kind(self) -> dict[str, str]:
        """The a* each Fisher kind of ``distances_by_kind`` would choose."""
        return {kind: closest_baseline(d) for kind, d in self.distances_by_kind.items()}

    @property
    def seconds(self) -> float:
        """Wall time of steps 1-4, the search cost reported in Table 1."""
        return self.probe_seconds + self.distance_seconds + self.search.seconds

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, as ``report.json`` and the main job's JSON hold them."""
        return {
            "target": self.target,
            "fisher": self.fisher,
            "distances": self.distances,
            "closest": self.closest,
            "distances_by_kind": self.distances_by_kind,
            "closest_by_kind": self.closest_by_kind,
            "baseline_genotype": self.baseline_genotype,
            "space_size": self.space_size,
            "full_space_size": self.full_space_size,
            "search": self.search.to_dict(),
            "evaluation": self.evaluation._asdict(),
            "probe_seconds": self.probe_seconds,
            "distance_seconds": self.distance_seconds,
            "search_seconds": self.seconds,
        }


@dataclass(frozen=True)
class TargetDistances:
    """Steps 1-2 under several Fisher kinds: ``distances[kind]`` maps each baseline to its
    distance to the target; ``probe_seconds`` trained the target probe (once, for all kinds);
    ``seconds[kind]`` measured that kind's distances."""

    distances: dict[str, dict[str, float]]
    probe_seconds: float
    seconds: dict[str, float]


def distances_by_kind(
    target: Task,
    dictionary: TaskDictionary,
    *,
    kinds: tuple[str, ...] | None = None,
    seed: int = 0,
    split: str = "val",
    device: torch.device | str = "cpu",
) -> TargetDistances:
    """Steps 1-2 for every Fisher kind of ``kinds`` (default: the dictionary's, then the other
    kinds of :data:`REPORTED_KINDS`), from one trained target probe.

    A baseline of the target's own name is left out (it would be a* at distance 0 and the
    search would only repeat its own); a dictionary holding nothing else is an error.
    ``device``: where the target probe trains and every FIM is computed.
    """
    s = dictionary.settings
    kinds = tuple(dict.fromkeys((s.fisher, *REPORTED_KINDS) if kinds is None else kinds))
    names = candidate_baselines(target, dictionary)
    start = time.perf_counter()
    probe = s.train_probe(target, seed, device)
    probe_seconds = time.perf_counter() - start
    probes: list[torch.nn.Module] = []
    distances, seconds = {}, {}
    for kind in kinds:
        start = time.perf_counter()  # the first kind's seconds include loading the probes
        probes = probes or [dictionary.load_probe(name).to(device) for name in names]
        reference = task_fim(probe, target, fisher=kind, seed=seed, split=split)
        others = [task_fim(p, target, fisher=kind, seed=seed, split=split) for p in probes]
        values = frechet_distances(reference, others).tolist()
        distances[kind] = dict(zip(names, values, strict=True))
        seconds[kind] = time.perf_counter() - start
    return TargetDistances(distances, probe_seconds, seconds)


def baseline_distances(
    target: Task,
    dictionary: TaskDictionary,
    *,
    seed: int = 0,
    split: str = "val",
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], float]:
    """Steps 1-2 under the dictionary's Fisher kind: ({baseline: distance to ``target``},
    seconds spent training the probe). See :func:`distances_by_kind` for several kinds."""
    kind = dictionary.settings.fisher
    result = distances_by_kind(
        target, dictionary, kinds=(kind,), seed=seed, split=split, device=device
    )
    return result.distances[kind], result.probe_seconds


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
    device: torch.device | str = "cpu",
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
    :mod:`fisher_fast.tasks.threads`). ``device``: where the probe, the distances, the search
    and the final training run.
    """
    with probe_threads(dictionary.settings.arch, threads):
        config = config or dictionary.settings.fuse
        kind = dictionary.settings.fisher
        measured = on_main(
            "the task distances",
            lambda: distances_by_kind(
                target, dictionary, seed=seed, split=distance_split, device=device
            ),
        )
        distances, probe_seconds = measured.distances[kind], measured.probe_seconds
        distance_seconds = measured.seconds[kind]  # the other kinds are a comparison, not cost
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
                device=device,
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
            device=device,
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
            fisher=kind,
            distances_by_kind=measured.distances,
        )
        if folder is not None and is_main():
            write_json(folder / "report.json", report.to_dict())
        return report


def fit_candidates(config: FuseConfig, space: SearchSpace) -> FuseConfig:
    """``config`` with at most ``space.size - 1`` candidates per round: a round mixes the
    incumbent with distinct other cells, so a small restricted space caps C (at least 1)."""
    return dataclasses.replace(config, candidates=max(1, min(config.candidates, space.size - 1)))
