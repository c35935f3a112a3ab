"""Device names given by a user, checked once where they enter, with an error that lists what
this machine has (a raw torch error for ``cuda`` on a CPU-only build is an AssertionError)."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The devices tensors can be placed on here: ``cpu``, then ``cuda:i`` and ``mps`` if any."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def parse_device(device: torch.device | str, what: str) -> torch.device:
    """``device`` as a :class:`torch.device`, without touching it (no CUDA context is made),
    else a ValueError saying ``what`` asked for it and which devices there are."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{what}: {device!r} is not a device name; use one of {', '.join(available_devices())}"
        ) from None


def resolve_device(device: torch.device | str, what: str) -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine, else a ValueError
    saying ``what`` asked for it and which devices there are."""
    resolved = parse_device(device, what)
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise ValueError(
            f"{what}: device {resolved} is not available on this machine ({reason}); use one "
            f"of {', '.join(available_devices())}"
        ) from None
    return resolved


def _first_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of a torch error message, cut at ``limit`` characters."""
    sentence = text.strip().split(". ")[0].splitlines()[0] if text.strip() else ""
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."
