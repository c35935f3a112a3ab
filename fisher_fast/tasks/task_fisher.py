"""The diagonal FIM of a probe on a task, and Definition 4 for one pair of probes.

d[a, b] compares F_{a,b}, the diagonal FIM of the probe trained on task a evaluated on task b's
test split, with F_{b,b}, that of the probe trained on b on the same data: the Fréchet distance
of the unit-trace diagonals (eq. 4), in [0, 1]; it is asymmetric because the data are b's.
Which labels each Fisher kind uses is set out in :mod:`fisher_fast.tasks.fisher_kinds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fisher_fast.distance import frechet_distance
from fisher_fast.fim import DiagFIM, diag_fim
from fisher_fast.tasks.fisher_kinds import check_fisher
from fisher_fast.tasks.task import Task, TaskSplits
from fisher_fast.tasks.train import Probe


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
    check_fisher(fisher)
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


@dataclass(frozen=True)
class FimSettings:
    """How the FIMs of a distance are computed: the Fisher kind, the labels drawn per sample
    for ``"mc"`` and the samples per batch; one value shared by every FIM of a comparison, so
    that its FIMs are computed alike."""

    fisher: str = "exact"
    mc_samples: int = 1
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_fisher(self.fisher)

    def fim(self, probe: Probe | nn.Module, task: Task, seed: int) -> DiagFIM:
        """:func:`task_fim` of ``probe`` on ``task``'s test split with these settings
        (``seed`` seeds the label draws of the "mc" kind)."""
        return task_fim(
            probe,
            task,
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            seed=seed,
            batch_size=self.batch_size,
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
    settings = FimSettings(fisher, mc_samples, batch_size)
    source = settings.fim(source_probe, target_task, seed)
    target = settings.fim(target_probe, target_task, seed)
    check_same_structure(source, target)
    return float(frechet_distance(target, source))


def check_same_structure(a: DiagFIM, b: DiagFIM) -> None:
    """Raise a ValueError unless the two FIMs have the same parameter names and shapes, the
    structural similarity Definition 3 asks of the probes whose FIMs are compared."""
    if a.names != b.names or a.shapes != b.shapes:
        raise ValueError(
            "the probes differ in architecture (parameter names or shapes), so their FIMs cannot be compared; "
            "Definition 3 needs structurally similar networks: one architecture and one head width for all tasks"
        )
