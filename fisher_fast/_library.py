"""Loads the compiled library fisher_fast._C and remembers whether that worked.

``import fisher_fast`` must work even when the library is missing or broken (a source checkout
that was never built, a torch upgrade that broke the ABI); the error is raised only when an op
is called, and says what failed and how to rebuild.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_BUILD_HELP = (
    "Build it from the repository root with `pip install --no-build-isolation .` "
    "(torch must already be installed; set FISHER_FAST_CUDA=1 to force the CUDA kernels), "
    "or run `make test`, which does it in .venv."
)

_module: ModuleType | None = None
_load_error: str | None = None

try:
    _module = importlib.import_module("fisher_fast._C")
except Exception as exc:  # any failure to load is reported at first use
    _load_error = f"{type(exc).__name__}: {exc}"


def is_loaded() -> bool:
    """True when the compiled library loaded and its ops are registered."""
    return _module is not None


def require() -> ModuleType:
    """Return the compiled module, or raise a RuntimeError saying why it is missing and what to do."""
    if _module is None:
        raise RuntimeError(
            f"fisher_fast's compiled library could not be loaded ({_load_error}). {_BUILD_HELP}"
        )
    return _module


def build_info() -> dict[str, Any]:
    """Versions, compilers, compiled kernels (CPU; CUDA and its architectures) and OpenMP threads
    of this build: ``cxx_compiler`` is the C++ compiler, ``cuda_compiler`` nvcc's version and
    ``cuda_host_compiler`` the host compiler nvcc ran (both empty without CUDA)."""
    return dict(require().build_info())
