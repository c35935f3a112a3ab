"""Refusing, before any work, a run whose results file would replace one of other settings:
a run directory holds one results file per Fisher kind, and a rerun with other settings would
silently overwrite the numbers it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def refuse_other_settings(path: Path, settings: dict[str, Any]) -> None:
    """Raise a ValueError before any work when ``path`` (a results JSON) holds a matrix of other
    settings than ``settings`` (what the values depend on besides the seeds, as recorded under
    its ``config``), which the run would silently replace. A file that cannot be read, or one
    without recorded settings, is left to be replaced."""
    try:
        saved = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return
    wanted = json.loads(json.dumps(settings))  # tuples as lists, as they were saved
    differing = [key for key, value in wanted.items() if key in saved and saved[key] != value]
    if differing:
        raise ValueError(
            f"{path} holds results computed with other settings ({', '.join(differing)} "
            "differ), which this run would replace: give this run its own directory (--out / "
            "out=), or pass --overwrite (overwrite=True) to replace them"
        )
