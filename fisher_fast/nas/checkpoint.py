"""Resumable FUSE: the state of a search after each finished round, saved atomically.

A round starts from the search generator's state and nothing else (its candidates are freshly
initialised and its batches come from a generator seeded by a draw of the search generator),
so the finished rounds plus the generator state after the last of them are all a resumed search
needs to continue exactly as an uninterrupted one would.

The file is JSON: the search's key (a SHA-256 of the space, the training data, the class count,
the settings except the budget, and the generator's initial state), the finished rounds, the
generator state (hex) and the seconds spent so far. A checkpoint of another search is refused
with an error rather than silently mixed in; the budget (``rounds``, ``time_budget_s``) may
change between sessions, so a finished search can be extended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisher_fast.io import write_json
from fisher_fast.nas.search_result import Round
from fisher_fast.nas.space import SearchSpace
from fisher_fast.part import Part
from fisher_fast.tasks.source import tensors_sha256

CHECKPOINT_FORMAT = "fisher_fast.fuse_checkpoint/1"
BUDGET_FIELDS = ("rounds", "time_budget_s")
"""FuseConfig fields that may change when a search is resumed."""


@dataclass(frozen=True)
class Checkpoint:
    """A search after ``len(rounds)`` finished rounds; ``generator_state`` is the search
    generator's state after the last of them, ``seconds`` the wall time spent so far."""

    key: str
    rounds: tuple[Round, ...]
    generator_state: torch.Tensor
    seconds: float


def search_key(
    space: SearchSpace,
    train_data: Part,
    num_classes: int,
    config: Any,
    initial_state: torch.Tensor,
) -> str:
    """SHA-256 naming one search: same key, same rounds (given the same network builder)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in BUDGET_FIELDS}
    description = {
        "format": CHECKPOINT_FORMAT,
        "space": [space.nodes, list(space.operations), [list(e) for e in space.structure]],
        "data": tensors_sha256([train_data.x, train_data.y]),
        "num_classes": num_classes,
        "settings": settings,
        "generator": hashlib.sha256(initial_state.numpy().tobytes()).hexdigest(),
    }
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically (a killed write leaves the previous file intact)."""
    write_json(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "key": checkpoint.key,
            "seconds": checkpoint.seconds,
            "generator_state": checkpoint.generator_state.numpy().tobytes().hex(),
            "rounds": [r.to_dict() for r in checkpoint.rounds],
        },
    )


def load_checkpoint(path: Path, key: str) -> Checkpoint | None:
    """The checkpoint at ``path`` if it belongs to the search ``key``; None when there is none.

    Raises ValueError, leaving the file untouched, when it is unreadable or belongs to another
    search (different space, data, settings or seed).
    """
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        state = torch.frombuffer(bytearray.fromhex(data["generator_state"]), dtype=torch.uint8)
        rounds = tuple(Round.from_dict(r) for r in data["rounds"])
        stored_key, seconds = str(data["key"]), float(data["seconds"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"the search checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); move it "
            "away to start the search afresh, or restore it"
        ) from exc
    if stored_key != key:
        raise ValueError(
            f"the search checkpoint {path} belongs to another search (a different space, "
            "training data, settings or seed); pass another checkpoint path, or delete this "
            "file to start afresh"
        )
    return Checkpoint(stored_key, rounds, state.clone(), seconds)
