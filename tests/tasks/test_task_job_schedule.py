"""The schedule of a distance matrix's jobs: every (trial, task) job runs on exactly one rank,
dealt round-robin by job number, and a single process runs them all."""

from __future__ import annotations

import pytest

from fisher_fast.tasks.job_schedule import job_number, jobs_of_rank, rank_of_job, tasks_of_rank


def test_jobs_are_numbered_trial_by_trial() -> None:
    numbers = [job_number(s, a, 3) for s in range(2) for a in range(3)]
    assert numbers == list(range(6))


@pytest.mark.parametrize(("trials", "tasks", "world"), [(2, 3, 2), (1, 4, 3), (5, 2, 4), (2, 2, 7)])
def test_every_job_runs_on_exactly_one_rank(trials: int, tasks: int, world: int) -> None:
    owners: dict[tuple[int, int], list[int]] = {}
    for rank in range(world):
        for s in range(trials):
            for a in tasks_of_rank(s, tasks, rank, world):
                owners.setdefault((s, a), []).append(rank)
    assert owners == {
        (s, a): [rank_of_job(s * tasks + a, world)] for s in range(trials) for a in range(tasks)
    }
    assert [jobs_of_rank(trials, tasks, r, world) for r in range(world)] == [
        len([j for j in range(trials * tasks) if j % world == r]) for r in range(world)
    ]


def test_round_robin_deals_two_ranks_alternately() -> None:
    """3 tasks, 2 trials, 2 ranks: jobs 0..5 alternate, so the trials split 2/1 and 1/2."""
    assert [tasks_of_rank(s, 3, 0, 2) for s in range(2)] == [[0, 2], [1]]
    assert [tasks_of_rank(s, 3, 1, 2) for s in range(2)] == [[1], [0, 2]]


def test_one_process_runs_every_job() -> None:
    assert [tasks_of_rank(s, 4, 0, 1) for s in range(3)] == [[0, 1, 2, 3]] * 3
    assert jobs_of_rank(3, 4, 0, 1) == 12
