"""One trial (one seed) of a distance matrix shared between the ranks of a process group: each
rank gets or computes its own jobs' probes and columns through a
:class:`~fisher_fast.tasks.run_store.RunStore` and receives the others' (trained probes as
weights, finished columns as distances), so that every rank ends the trial with all of it.
Without a process group one rank holds every job and nothing is exchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from fisher_fast.distance import frechet_distances
from fisher_fast.distributed import all_outcomes, world_size
from fisher_fast.tasks.run_store import KeyedProbe, RunStore
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.task_fisher import check_same_structure

SharedProbe = tuple[int, dict[str, torch.Tensor], dict[str, Any], str]
"""A probe as it travels between ranks: task index, CPU weights, metadata, content hash."""


def trial_probes(
    store: RunStore, tasks: list[Task], seed: int, ours: list[int], bar: tqdm[Any]
) -> list[KeyedProbe]:
    """Every task's probe in trial ``seed``, in task order: this rank gets or trains those of
    the task indices ``ours``; the other ranks' probes arrive as weights and metadata and are
    rebuilt here."""
    done: dict[int, KeyedProbe] = {}

    def work() -> list[SharedProbe]:
        for a in ours:
            done[a] = store.probe(tasks[a], seed)
            bar.update(1)
        if world_size() == 1:
            return []
        return [
            (
                a,
                {n: t.detach().cpu() for n, t in k.probe.model.state_dict().items()},
                k.probe.metadata(),
                k.digest,
            )
            for a, k in done.items()
        ]

    for shared in all_outcomes(f"training the probes of seed {seed}", work):
        for a, state, meta, digest in shared:
            if a not in done:
                rebuilt = store.recipe.rebuild(tasks[a], seed, state, meta, store.device)
                done[a] = KeyedProbe(rebuilt, digest)
    return [done[a] for a in range(len(tasks))]


def trial_columns(
    store: RunStore,
    tasks: list[Task],
    seed: int,
    probes: list[KeyedProbe],
    ours: list[int],
    bar: tqdm[Any],
) -> dict[int, torch.Tensor]:
    """Columns d[:, b] of trial ``seed``, (K,) float64 each, for every target b: this rank
    gets or computes the FIMs F[a, b] of the targets ``ours``; the other ranks send their
    columns of distances, not their FIMs."""

    def work() -> dict[int, torch.Tensor]:
        columns = {}
        for b in ours:
            fims = []
            for a, source in enumerate(tasks):
                fims.append(store.fim(probes[a], source, tasks[b], seed))
                bar.update(1)
            for fim in fims:
                check_same_structure(fims[b], fim)
            columns[b] = frechet_distances(fims[b], fims).cpu()
        return columns

    shared = all_outcomes(f"computing the FIMs of seed {seed}", work)
    return {b: column for part in shared for b, column in part.items()}
