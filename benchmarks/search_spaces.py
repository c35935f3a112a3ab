"""The paper's central claim, measured: FUSE in the restricted space S_a* of the closest baseline
against FUSE in the full space and random search in S_a*, with the same budget, over seeds.

Uses an existing task dictionary (e.g. the main job's, ``runs/demo-seed0/dictionary``), finds a*
for the target once, then for each seed runs the three searches on the target's training split
and trains and tests each winner exactly as the main job does. Prints mean ± standard deviation
of test accuracy and search seconds, and writes every run to a JSON file.

    python benchmarks/search_spaces.py --dictionary runs/demo-seed0/dictionary --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fisher_fast.io import write_json
from fisher_fast.nas import SearchSpace, fuse_search, random_search, train_and_evaluate
from fisher_fast.pipeline import TaskDictionary, baseline_distances, closest_baseline
from fisher_fast.pipeline.algorithm import DEFAULT_FINAL_STEPS, fit_candidates
from fisher_fast.tasks.suites import digits_suite


def run_seed(
    dictionary: TaskDictionary, target: int, restricted: SearchSpace, seed: int
) -> dict[str, Any]:
    """The three searches and their final evaluations for one seed."""
    task = digits_suite().tasks[target]
    splits = task.splits()
    config = fit_candidates(dictionary.settings.fuse, restricted)
    full = SearchSpace.full(dictionary.settings.nodes)
    out: dict[str, Any] = {}
    budget = 0
    for name, space in (("FUSE in S_a*", restricted), ("FUSE in the full space", full)):
        generator = torch.Generator().manual_seed(seed)
        result = fuse_search(
            space, splits.train, num_classes=task.num_classes, generator=generator,
            config=config if space is restricted else dictionary.settings.fuse,
        )  # fmt: skip
        budget = budget or result.steps
        out[name] = (result, generator)
    generator = torch.Generator().manual_seed(seed)
    out["random search in S_a*"] = (
        random_search(
            restricted, splits.train, num_classes=task.num_classes, budget=budget,
            generator=generator, config=config,
        ),
        generator,
    )  # fmt: skip
    rows = {}
    for name, (result, gen) in out.items():
        evaluation = train_and_evaluate(
            result.genotype, splits.train, splits.test, num_classes=task.num_classes,
            steps=DEFAULT_FINAL_STEPS, generator=gen, config=config, val_data=splits.val,
        )  # fmt: skip
        rows[name] = {
            "genotype": result.genotype.to_string(),
            "steps": result.steps,
            "search_seconds": result.seconds,
            "test_accuracy": evaluation.test_accuracy,
            "parameters": evaluation.parameters,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionary", type=Path, required=True)
    parser.add_argument("--target", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_spaces.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dictionary = TaskDictionary.open(args.dictionary)
    target = digits_suite().tasks[args.target]
    distances, _ = baseline_distances(target, dictionary)
    closest = closest_baseline(distances)
    restricted = SearchSpace.restricted_to(dictionary[closest].genotype)
    print(f"a* = {closest} (distances {distances}); S_a* has {restricted.size} cells")
    start = time.perf_counter()
    runs = [run_seed(dictionary, args.target, restricted, seed) for seed in range(args.seeds)]
    print(f"{args.seeds} seeds in {time.perf_counter() - start:.0f} s")
    print(f"{'method':28s} {'test accuracy (%)':>22s} {'search time (s)':>18s}  per seed (%)")
    for name in runs[0]:
        acc = [100 * r[name]["test_accuracy"] for r in runs]
        sec = [r[name]["search_seconds"] for r in runs]
        print(
            f"{name:28s} {statistics.mean(acc):13.2f} ± {statistics.stdev(acc):5.2f} "
            f"{statistics.mean(sec):10.1f} ± {statistics.stdev(sec):4.1f}  "
            + " ".join(f"{a:.1f}" for a in acc)
        )
    write_json(
        args.out,
        {"closest": closest, "distances": distances, "space_size": restricted.size, "runs": runs},
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
