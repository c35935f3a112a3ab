"""The paper's central claim, tested: is FUSE in the space of the closest known task better than
searching elsewhere with the same budget?

By default the target is task 0 of the ``digits-clutter`` suite (ten digits at a random place on
a cluttered 16x16 canvas, where the searched cell matters) and the baselines are the suite's
other three tasks (same inputs with other labels, same labels on clean centred inputs, a
detector on clean inputs); ``--suite digits --target 2`` runs the same test on the 8x8 digits
(with ``--out runs/demo`` it reuses the main job's dictionary). The baselines' dictionary is
built (or reused) as the main job builds it; the target's distances to them give the closest a*
and the farthest baseline a°. Then, for each seed, with the main job's FUSE setting:

* FUSE in S_a* (Algorithm 1), FUSE in S_a° (a small space that is *not* the similar task's:
  without it, "the similar task's space" is confounded with "any small space"), FUSE in the
  full space;
* random search in S_a* and in the full space, each with the budget (candidate-steps) that
  FUSE in S_a* spent for that seed;
* each winner trained and tested as the main job does (same steps, validation-selected state).

Reported: test accuracy and search seconds, mean ± standard deviation over seeds, and a paired
t-test over seeds of FUSE in S_a* against each other method (with wins / ties / losses). Every
seed's rows are written to ``OUT/fair-test.json`` as soon as they exist (atomic writes): a rerun
skips the seeds already there.

    python scripts/fair_test.py --out runs/fair-test --seeds 5
    python scripts/fair_test.py --suite digits --target 2 --out runs/demo --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from fisher_fast.io import write_json
from fisher_fast.nas import SearchSpace, fuse_search, random_search, train_and_evaluate
from fisher_fast.nas.fuse import FuseConfig
from fisher_fast.nas.search_result import SearchResult
from fisher_fast.pipeline import baseline_distances, closest_baseline
from fisher_fast.pipeline.algorithm import DEFAULT_FINAL_STEPS, fit_candidates
from fisher_fast.pipeline.dictionary import DictionarySettings, TaskDictionary, build_dictionary
from fisher_fast.pipeline.main_job import MAIN_JOB_FUSE
from fisher_fast.tasks.suites import EMBEDDED, Suite, get_suite
from fisher_fast.tasks.task import Task

DEFAULT_TARGETS = {"digits-clutter": 0}  # the main job's target (task 2) for other suites
REFERENCE = "FUSE in S_a*"


def dictionary_of_baselines(
    suite: Suite, target_index: int, root: Path, progress: bool
) -> tuple[Task, TaskDictionary]:
    """The target task and the dictionary of the suite's other tasks (built once, then reused)."""
    target = suite.tasks[target_index]
    settings = DictionarySettings.for_suite(suite, target, MAIN_JOB_FUSE)
    baselines = [t for i, t in enumerate(suite.tasks) if i != target_index]
    return target, build_dictionary(root / "dictionary", baselines, settings, progress=progress)


def run_seed(
    target: Task, spaces: dict[str, SearchSpace], full: SearchSpace, seed: int
) -> dict[str, dict[str, Any]]:
    """The five searches of one seed and their final evaluations."""
    splits = target.splits()
    searches: dict[str, tuple[SearchResult, torch.Generator, FuseConfig]] = {}
    for name, space in (*spaces.items(), ("FUSE in the full space", full)):
        config = fit_candidates(MAIN_JOB_FUSE, space) if space is not full else MAIN_JOB_FUSE
        generator = torch.Generator().manual_seed(seed)
        result = fuse_search(
            space, splits.train, num_classes=target.num_classes, generator=generator,
            config=config,
        )  # fmt: skip
        searches[name] = (result, generator, config)
    budget = searches[REFERENCE][0].steps
    restricted = spaces[REFERENCE]
    for name, space in (("random search in S_a*", restricted), ("random search, full space", full)):
        config = fit_candidates(MAIN_JOB_FUSE, space) if space is not full else MAIN_JOB_FUSE
        generator = torch.Generator().manual_seed(seed)
        result = random_search(
            space, splits.train, num_classes=target.num_classes, budget=budget,
            generator=generator, config=config,
        )  # fmt: skip
        searches[name] = (result, generator, config)
    rows = {}
    for name, (result, generator, config) in searches.items():
        evaluation = train_and_evaluate(
            result.genotype, splits.train, splits.test, num_classes=target.num_classes,
            steps=DEFAULT_FINAL_STEPS, generator=generator, config=config, val_data=splits.val,
        )  # fmt: skip
        rows[name] = {
            "genotype": result.genotype.to_string(),
            "steps": result.steps,
            "search_seconds": result.seconds,
            "test_accuracy": evaluation.test_accuracy,
            "parameters": evaluation.parameters,
        }
    return rows


def paired_line(name: str, runs: list[dict[str, Any]]) -> str:
    """FUSE in S_a* against ``name`` over the seeds: mean difference, t-test, wins."""
    ours = [r[REFERENCE]["test_accuracy"] for r in runs]
    theirs = [r[name]["test_accuracy"] for r in runs]
    diff = [100 * (a - b) for a, b in zip(ours, theirs, strict=True)]
    wins = sum(d > 0 for d in diff), sum(d == 0 for d in diff), sum(d < 0 for d in diff)
    test = stats.ttest_rel(ours, theirs) if any(diff) else None
    p = (
        "p = 1 (no difference on any seed)"
        if test is None
        else f"t = {test.statistic:.2f}, p = {test.pvalue:.3f}"
    )
    return (
        f"{REFERENCE} - {name}: {statistics.mean(diff):+.2f} ± {statistics.stdev(diff):.2f} "
        f"points; {p}; wins/ties/losses {wins[0]}/{wins[1]}/{wins[2]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=EMBEDDED, default="digits-clutter")
    parser.add_argument("--target", type=int, help="target task index (default 0 on "
                        "digits-clutter, else 2)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/fair-test"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (a paired test needs two seeds)")
    torch.set_num_threads(1)
    start = time.perf_counter()
    suite = get_suite(args.suite)
    target_index = DEFAULT_TARGETS.get(suite.name, 2) if args.target is None else args.target
    if not 0 <= target_index < len(suite.tasks):
        parser.error(f"--target must be a task index 0..{len(suite.tasks) - 1}")
    target, dictionary = dictionary_of_baselines(suite, target_index, args.out, not args.quiet)
    distances, _ = baseline_distances(target, dictionary)
    closest = closest_baseline(distances)
    farthest = max(distances, key=distances.__getitem__)
    spaces = {
        REFERENCE: SearchSpace.restricted_to(dictionary[closest].genotype),
        "FUSE in S_a° (farthest)": SearchSpace.restricted_to(dictionary[farthest].genotype),
    }
    full = SearchSpace.full(dictionary.settings.nodes)
    print(f"target {target.name!r}; distances ({dictionary.settings.fisher} Fisher): {distances}")
    print(f"a* = {closest!r} ({spaces[REFERENCE].size} cells), a° = {farthest!r} "
          f"({spaces['FUSE in S_a° (farthest)'].size} cells), full space {full.size} cells")  # fmt: skip
    path = args.out / "fair-test.json"
    summary: dict[str, Any] = {
        "suite": suite.name,
        "target": target.name, "distances": distances, "closest": closest, "farthest": farthest,
        "fuse": MAIN_JOB_FUSE.to_dict(), "final_steps": DEFAULT_FINAL_STEPS,
        "test_images": len(target.splits().test.y), "runs": {},
    }  # fmt: skip
    if path.exists():
        done = json.loads(path.read_text())
        same = (done.get("target"), done.get("closest"), done.get("farthest"))
        if same == (target.name, closest, farthest):
            summary["runs"] = done["runs"]
    for seed in range(args.seeds):
        if str(seed) in summary["runs"]:
            continue
        seed_start = time.perf_counter()
        summary["runs"][str(seed)] = run_seed(target, spaces, full, seed)
        write_json(path, summary)
        print(f"seed {seed} done in {time.perf_counter() - seed_start:.0f} s")
    runs = [summary["runs"][str(s)] for s in range(args.seeds)]
    print(f"\n{args.seeds} seeds, {summary['test_images']} test images; "
          f"{time.perf_counter() - start:.0f} s this run")  # fmt: skip
    print(f"{'method':30s} {'test accuracy (%)':>20s} {'search (s)':>14s}  per seed (%)")
    for name in runs[0]:
        acc = [100 * r[name]["test_accuracy"] for r in runs]
        sec = [r[name]["search_seconds"] for r in runs]
        print(
            f"{name:30s} {statistics.mean(acc):11.2f} ± {statistics.stdev(acc):5.2f} "
            f"{statistics.mean(sec):8.1f} ± {statistics.stdev(sec):4.1f}  "
            + " ".join(f"{a:.1f}" for a in acc)
        )
    print()
    for name in runs[0]:
        if name != REFERENCE:
            print(paired_line(name, runs))
    print(f"written {path}")


if __name__ == "__main__":
    main()
