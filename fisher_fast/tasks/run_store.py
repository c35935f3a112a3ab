"""The probes and FIMs of a distance-matrix run, got or computed: looked up in the run
directory's cache (:class:`~fisher_fast.tasks.cache.RunCache`) when it holds a valid file, else
trained or computed and cached there, so a rerun or a resumed run redoes nothing. Without a run
directory everything is computed.

The cache keys say what a file depends on: a probe's, its task, recipe and seed; a FIM's, the
content hash of the probe's weights (so a retrained probe never reuses the FIMs of old
weights), the target task and the Fisher settings that change its values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fisher_fast.fim import DiagFIM
from fisher_fast.tasks.cache import RunCache, config_key
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.task_fisher import FimSettings
from fisher_fast.tasks.train import Probe, ProbeRecipe, warn_if_not_reached


@dataclass(frozen=True)
class KeyedProbe:
    """A probe with the content hash of its weights, which keys the FIMs computed from it
    (empty without a cache, where nothing is keyed)."""

    probe: Probe
    digest: str


class RunStore:
    """Probes of ``recipe`` and FIMs of ``fims`` for one run on ``device``, from ``cache`` (a
    run directory, or None for none) or computed and cached."""

    def __init__(
        self,
        recipe: ProbeRecipe,
        fims: FimSettings,
        device: str | torch.device,
        cache: RunCache | None,
    ) -> None:
        self.recipe, self.fims, self.device, self.cache = recipe, fims, device, cache

    def probe(self, task: Task, seed: int) -> KeyedProbe:
        """The probe of ``task`` in trial ``seed``: loaded when the cache holds valid weights
        that fit the recipe's architecture, else trained (and cached)."""
        if self.cache is None:
            return KeyedProbe(self.recipe.train_probe(task, seed, self.device), "")
        key = self._probe_key(task, seed)
        path = self.cache.probe_path(f"{task.slug}-{self.recipe.arch}-seed{seed}", key)
        loaded = self.cache.load_state(path, key)
        if loaded is not None:
            state, meta, digest = loaded
            try:
                probe = self.recipe.rebuild(task, seed, state, meta, self.device)
            except RuntimeError as exc:
                self.cache.reject(
                    path, f"its weights do not fit probe {self.recipe.arch!r} ({exc})"
                )
            else:
                warn_if_not_reached(probe)
                return KeyedProbe(probe, digest)
        trained = self.recipe.train_probe(task, seed, self.device)
        digest = self.cache.save_state(path, key, trained.model.state_dict(), trained.metadata())
        return KeyedProbe(trained, digest)

    def fim(self, keyed: KeyedProbe, source: Task, target: Task, seed: int) -> DiagFIM:
        """F[source, target] in trial ``seed``: the FIM of ``keyed`` (the probe of ``source``)
        on ``target``'s test split, from the cache or computed (and cached), on the probe's
        device."""
        probe = keyed.probe
        if self.cache is None:
            return self.fims.fim(probe, target, seed)
        key = self._fim_key(keyed.digest, target, seed)
        label = f"{source.slug}--{target.slug}-seed{seed}"
        path = self.cache.fim_path(self.fims.fisher, label, key)
        fim = self.cache.load_fim(path, key)
        if fim is None:
            fim = self.fims.fim(probe, target, seed)
            self.cache.save_fim(path, key, fim)
        return fim.to(next(probe.model.parameters()).device)

    def _probe_key(self, task: Task, seed: int) -> str:
        return config_key(
            {
                "kind": "probe",
                "task": task.fingerprint(),
                "arch": self.recipe.arch,
                "head_width": self.recipe.head_width,
                "seed": seed,
                "train": self.recipe.train.to_dict(),
            }
        )

    def _fim_key(self, digest: str, target: Task, seed: int) -> str:
        fisher = self.fims.fisher
        return config_key(
            {
                "kind": "fim",
                "probe": digest,
                "target": target.fingerprint(),
                "fisher": fisher,
                "mc_samples": self.fims.mc_samples if fisher == "mc" else None,
                "seed": seed if fisher == "mc" else None,
            }
        )
