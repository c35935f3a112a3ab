"""The run directory: trained probes and FIMs cached on disk, written atomically, verified on load.

Layout of a run directory::

    probes/<task>-<arch>-seed<s>-<key>.safetensors       weights + metadata of one probe
    fims/<fisher>/<source>--<target>-seed<s>-<key>.safetensors   one DiagFIM F_{source,target}
    results-<fisher>.json, distance-<fisher>.png         written by the report

Every file carries in its metadata the full key of the configuration that produced it (a
SHA-256 of a canonical JSON description) and a SHA-256 of its tensors. A file is trusted only
when both match; anything else (truncated, corrupted, foreign) is reported with a
:class:`CacheWarning` and recomputed. Writes go to a temporary file in the same folder, are
flushed to disk, then renamed over the target (``os.replace``), so a killed run leaves either
the old file, the new one, or an ignored ``.*.tmp`` leftover, never a partial file under a
trusted name. A FIM's key includes the content hash of the probe it was computed from, so a
retrained probe never reuses FIMs of the old weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fisher_fast.fim.result import DiagFIM
from fisher_fast.io import atomic_write
from fisher_fast.tasks.source import tensors_sha256

CACHE_VERSION = 1
"""Bumped when the meaning of cached files changes; part of every key."""


class CacheWarning(UserWarning):
    """A cached file could not be trusted and is recomputed."""


def config_key(description: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``description`` (with the cache version)."""
    text = json.dumps(
        {"cache_version": CACHE_VERSION, **description}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes), independent of its order."""
    return hashlib.sha256(
        "".join(f"{name}:{tensors_sha256([state[name]])};" for name in sorted(state)).encode()
    ).hexdigest()


class RunCache:
    """Probes and FIMs of one run directory, looked up by configuration key."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def probe_path(self, label: str, key: str) -> Path:
        return self.root / "probes" / f"{label}-{key[:16]}.safetensors"

    def fim_path(self, fisher: str, label: str, key: str) -> Path:
        return self.root / "fims" / fisher / f"{label}-{key[:16]}.safetensors"

    def save_state(
        self, path: Path, key: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> str:
        """Write a state dict with its metadata; return its content hash."""
        from safetensors.torch import save_file

        tensors = {n: t.detach().cpu().contiguous() for n, t in state.items()}
        digest = state_sha256(tensors)
        metadata = {"cache_key": key, "sha256": digest, "meta": json.dumps(dict(meta))}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return digest

    def load_state(
        self, path: Path, key: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str] | None:
        """(state dict, metadata, content hash) of a verified file, or None (missing or bad)."""
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
            meta = json.loads(metadata["meta"])
        except Exception as exc:
            return self.reject(path, f"unreadable ({type(exc).__name__}: {exc})")
        problem = self._check(
            metadata.get("cache_key"), metadata.get("sha256"), key, state_sha256(state)
        )
        if problem:
            return self.reject(path, problem)
        return state, meta, metadata["sha256"]

    def save_fim(self, path: Path, key: str, fim: DiagFIM) -> None:
        """Write a FIM, its key and its content hash in its metadata."""
        fim.meta.update(cache_key=key, sha256=tensors_sha256([fim.flat]))
        fim.save(path)

    def load_fim(self, path: Path, key: str) -> DiagFIM | None:
        """A verified FIM, or None (missing or bad)."""
        if not path.exists():
            return None
        try:
            fim = DiagFIM.load(path)
        except Exception as exc:
            return self.reject(path, f"unreadable ({type(exc).__name__}: {exc})")
        problem = self._check(
            fim.meta.get("cache_key"), fim.meta.get("sha256"), key, tensors_sha256([fim.flat])
        )
        return self.reject(path, problem) if problem else fim

    @staticmethod
    def _check(stored_key: Any, stored_hash: Any, key: str, content_hash: str) -> str | None:
        if stored_key != key:
            return "it was written for another configuration (key mismatch)"
        if stored_hash != content_hash:
            return "its content does not match its checksum (corrupted)"
        return None

    @staticmethod
    def reject(path: Path, why: str) -> None:
        """Report a cached file that cannot be trusted (it will be recomputed)."""
        warnings.warn(
            f"ignoring cached file {path}: {why}; recomputing it", CacheWarning, stacklevel=2
        )
        return None
