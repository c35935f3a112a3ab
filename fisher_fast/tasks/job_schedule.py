"""Which jobs of a distance matrix each process runs: a pure function of the trial, the task,
the number of tasks and the ranks, so every rank computes the same schedule without talking.

Trial ``s`` (the s-th seed) of K tasks has K jobs; job ``a`` of it trains task a's probe, then
computes the FIMs and distances of target column a. Jobs are numbered ``s * K + a`` across the
trials and dealt round-robin: job j goes to rank ``j % world_size``, which spreads both the
probes and the columns of every trial over the ranks.
"""

from __future__ import annotations


def job_number(trial: int, task: int, tasks: int) -> int:
    """The number of job ``task`` (a task index) of trial ``trial`` (an index into the seeds)
    among all jobs, for a matrix of ``tasks`` tasks."""
    return trial * tasks + task


def rank_of_job(job: int, world_size: int) -> int:
    """The rank that runs job number ``job`` out of ``world_size`` ranks (round-robin)."""
    return job % world_size


def tasks_of_rank(trial: int, tasks: int, rank: int, world_size: int) -> list[int]:
    """The task indices whose jobs of trial ``trial`` rank ``rank`` runs, in task order."""
    return [a for a in range(tasks) if rank_of_job(job_number(trial, a, tasks), world_size) == rank]


def jobs_of_rank(trials: int, tasks: int, rank: int, world_size: int) -> int:
    """How many jobs of ``trials`` trials of ``tasks`` tasks rank ``rank`` runs."""
    return sum(len(tasks_of_rank(s, tasks, rank, world_size)) for s in range(trials))
