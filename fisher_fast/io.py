"""Files written atomically: the one way every part of the package saves what it computed.

A write goes to a temporary file in the target's folder, is flushed to disk, given the usual
permissions and renamed over the target (``os.replace``), so that a killed process leaves the
old file, the new one, or an ignored ``.*.tmp`` leftover, never a partial file under the
target's name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, rename it to
    ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, value: Any) -> None:
    """Atomically write ``value`` as indented JSON."""
    text = json.dumps(value, indent=2) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)
