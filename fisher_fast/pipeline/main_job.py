"""The main job: Algorithm 1 end to end on a suite, reported in the form of the paper's Table 1.

For a target task and the suite's other tasks as baselines: build (or reuse) the task
dictionary, run :func:`~fisher_fast.pipeline.algorithm.search_architecture`, then, for
comparison on the same target with the same seed,

* random search in the same restricted space with the same budget (candidate-steps),
* FUSE in the full space with the same setting (the paper's central claim is that the
  restricted space is the better place to search),
* the hand-designed probes trained directly on the target,

and print one table (test accuracy on the test split, one seed; parameters in millions; search
seconds) and the baselines' distances under the exact and the empirical Fisher (the paper's
kind; the dictionary's kind decides a*, the other is shown beside it), with the report written
to ``out`` as JSON and a figure. Everything but the dictionary is recomputed on a rerun,
except the FUSE rounds, which are checkpointed and resumed. Under torch.distributed (torchrun)
the searches and final trainings run data-parallel; rank 0 trains the probes and writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisher_fast.devices import resolve_device
from fisher_fast.distributed import is_main, on_main
from fisher_fast.extras import require_module
from fisher_fast.io import write_json
from fisher_fast.nas import (
    FuseConfig,
    SearchSpace,
    fuse_search,
    random_search,
    train_and_evaluate,
)
from fisher_fast.pipeline.algorithm import (
    DECIDING_KIND_REASON,
    DEFAULT_FINAL_STEPS,
    ArchitectureReport,
    search_architecture,
)
from fisher_fast.pipeline.dictionary import DictionarySettings, build_dictionary
from fisher_fast.pipeline.table import (
    Row,
    format_distances,
    format_genotypes,
    format_table,
    plot_report,
)
from fisher_fast.tasks.probes import PROBES, SMALL_PROBES
from fisher_fast.tasks.suites import Suite
from fisher_fast.tasks.threads import probe_threads
from fisher_fast.tasks.train import train_probe

MAIN_JOB_FUSE = FuseConfig(candidates=3, rounds=4, max_steps=60)
"""The main job's FUSE setting: four rounds of four mixed candidates, at most 60 steps each."""


@dataclass(frozen=True)
class MainJobResult:
    """The Table 1 rows, the Algorithm 1 report, and where the files went; ``test_images`` is
    the size of the test split every accuracy is measured on, ``seeds`` the seeds run."""

    rows: tuple[Row, ...]
    report: ArchitectureReport
    json_path: Path
    figure_path: Path
    test_images: int
    seeds: int = 1

    def format(self) -> str:
        """The printed report: the distances under each Fisher kind (which one decides a*,
        and why), the size of S_a*, Table 1 with its test-set line, and the cells found."""
        r = self.report
        return "\n".join(
            [
                format_distances(r.distances_by_kind, r.fisher, DECIDING_KIND_REASON[r.fisher]),
                f"restricted space S_a*: {r.space_size} cells (the full space has "
                f"{r.full_space_size}); search time includes the target probe and the distances",
                format_table(self.rows, test_images=self.test_images, seeds=self.seeds),
                format_genotypes(self.rows),
            ]
        )


def run_main_job(
    suite: Suite,
    target: int,
    out: str | os.PathLike[str],
    *,
    baselines: Sequence[int] | None = None,
    seed: int = 0,
    config: FuseConfig = MAIN_JOB_FUSE,
    nodes: int = 4,
    final_steps: int = DEFAULT_FINAL_STEPS,
    progress: bool = True,
    threads: int | None = None,
    hand_designed: Sequence[str] = tuple(SMALL_PROBES),
    device: torch.device | str = "cpu",
) -> MainJobResult:
    """Run the pipeline for ``suite.tasks[target]`` with the tasks ``baselines`` (default: all
    others) as the dictionary, in the run directory ``out`` (see module doc).

    ``hand_designed``: the probe architectures (names of
    :data:`~fisher_fast.tasks.probes.PROBES`) trained directly on the target for the table's
    hand-designed rows; default the small probes, the paper's VGG-16 / ResNet-18 /
    DenseNet-121 are accepted too.

    ``threads``: torch's CPU threads meanwhile (default: 1 for the small probes; see
    :mod:`fisher_fast.tasks.threads`). ``device``: where every probe, search and final training
    runs (checked first).
    """
    device = resolve_device(device, "run_main_job(device=...)")
    with probe_threads(suite.default_arch, threads):
        unknown = [arch for arch in hand_designed if arch not in PROBES]
        if unknown:
            raise ValueError(
                f"unknown hand-designed architectures {unknown}; choose from {', '.join(PROBES)}"
            )
        if not 0 <= target < len(suite.tasks):
            raise ValueError(f"target must be a task index 0..{len(suite.tasks) - 1}, got {target}")
        others = (
            [i for i in range(len(suite.tasks)) if i != target] if baselines is None else baselines
        )
        if target in others or not others:
            raise ValueError(
                f"the baselines {list(others)} must be non-empty and exclude the target"
            )
        require_module("matplotlib", "the figure main-job.png of the main job")
        root = Path(out)
        task = suite.tasks[target]
        settings = DictionarySettings.for_suite(suite, task, config, nodes)
        start = time.perf_counter()
        dictionary = build_dictionary(
            root / "dictionary",
            [suite.tasks[i] for i in others],
            settings,
            seed=seed,
            progress=progress,
            threads=threads,
            device=device,
        )
        dictionary_seconds = time.perf_counter() - start
        report = search_architecture(
            task,
            dictionary,
            seed=seed,
            final_steps=final_steps,
            out=root / "search",
            progress=progress,
            threads=threads,
            device=device,
        )
        rows = [
            Row(
                f"FUSE in S_a* (closest baseline: {report.closest})",
                report.evaluation.test_accuracy,
                report.evaluation.parameters,
                report.seconds,
                report.search.genotype.to_string(),
            ),
            *_same_budget_rows(
                suite,
                target,
                report,
                SearchSpace.restricted_to(dictionary[report.closest].genotype),
                root,
                seed,
                config,
                final_steps,
                progress,
                device,
            ),
            *on_main(
                "training the hand-designed probes",
                lambda: _probe_rows(suite, target, seed, hand_designed, device),
            ),
        ]
        test_images = len(task.splits().test.y)
        summary: dict[str, Any] = {
            "suite": suite.name,
            "target": task.name,
            "baselines": [suite.tasks[i].name for i in others],
            "seed": seed,
            "seeds": 1,
            "test_images": test_images,
            "closest_baseline": {
                "decided_by": report.fisher,
                "why": DECIDING_KIND_REASON[report.fisher],
                "closest": report.closest,
                "by_kind": {
                    kind: {"distances": d, "closest": report.closest_by_kind[kind]}
                    for kind, d in report.distances_by_kind.items()
                },
            },
            "dictionary_seconds": dictionary_seconds,
            "algorithm1": report.to_dict(),
            "table": [r._asdict() for r in rows],
        }
        json_path, figure_path = root / "main-job.json", root / "main-job.png"
        if is_main():
            write_json(json_path, summary)
            plot_report(rows, report.distances, report.closest, figure_path)
        return MainJobResult(tuple(rows), report, json_path, figure_path, test_images)


def _same_budget_rows(
    suite: Suite,
    target: int,
    report: ArchitectureReport,
    restricted: SearchSpace,
    root: Path,
    seed: int,
    config: FuseConfig,
    final_steps: int,
    progress: bool,
    device: torch.device,
) -> list[Row]:
    """Random search in ``restricted`` (S_a*) and FUSE in the full space, each with the budget
    FUSE spent in S_a*, each winner trained and tested like the found cell."""
    splits = suite.tasks[target].splits()
    classes = suite.tasks[target].num_classes
    rows = []
    generator = torch.Generator().manual_seed(seed)
    rnd = report.search  # a space of one cell: nothing to search, as for FUSE
    if report.search.steps:
        rnd = random_search(
            restricted,
            splits.train,
            num_classes=classes,
            budget=report.search.steps,
            generator=generator,
            config=config,
            device=device,
        )
    full = SearchSpace.full(report.search.genotype.nodes)
    full_generator = torch.Generator().manual_seed(seed)
    fuse_full = fuse_search(
        full,
        splits.train,
        num_classes=classes,
        generator=full_generator,
        config=config,
        checkpoint=root / "full-space" / "fuse.json",
        progress=progress,
        device=device,
    )
    for name, result, gen in (
        ("random search in S_a*, same budget", rnd, generator),
        ("FUSE in the full space, same setting", fuse_full, full_generator),
    ):
        evaluation = train_and_evaluate(
            result.genotype,
            splits.train,
            splits.test,
            num_classes=classes,
            steps=final_steps,
            val_data=splits.val,
            generator=gen,
            config=config,
            device=device,
        )
        rows.append(
            Row(
                name,
                evaluation.test_accuracy,
                evaluation.parameters,
                result.seconds,
                result.genotype.to_string(),
            )
        )
    return rows


def _probe_rows(
    suite: Suite, target: int, seed: int, archs: Sequence[str], device: torch.device
) -> list[Row]:
    """The hand-designed probes ``archs`` trained on the target (no search: search seconds 0)."""
    task = suite.tasks[target]
    rows = []
    for arch in archs:
        probe = train_probe(
            task, arch, epsilon=suite.epsilon, seed=seed, config=suite.train, device=device
        )
        parameters = sum(p.numel() for p in probe.model.parameters())
        rows.append(Row(f"hand-designed {arch}", probe.test_accuracy, parameters, 0.0, ""))
    return rows
