"""Loads the compiled library fisher_fast._C and remembers whether that worked.

``import fisher_fast`` must work even when the library is missing or broken (a source checkout
that was never built, a torch upgrade that broke the ABI); the error is raised only when an op
is called, and says what failed and how to rebuild.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

_BUILD_HELP = (
    "Build it against the torch you run, from the repository root: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` "
    "(torch must already be installed; set FISHER_FAST_CUDA=1 to force the CUDA kernels), "
    "or run `make build`, which does it in .venv."
)

_module: ModuleType | None = None  # the compiled module, even when it is refused below
_load_error: str | None = None

try:
    _module = importlib.import_module("fisher_fast._C")
except Exception as exc:  # any failure to load is reported at first use
    _load_error = f"{type(exc).__name__}: {exc}"


def torch_mismatch(built_with: str, running: str) -> str | None:
    """Why a library compiled against torch ``built_with`` must not run under torch ``running``
    (torch's C++ ABI changes between releases: the ops could crash or compute garbage), or
    None when they are the same build."""
    if built_with == running:
        return None
    return (
        f"it was compiled against torch {built_with} but this process runs torch {running} "
        "(a different torch, e.g. one that pip downloaded into an isolated build environment, "
        "or a torch upgraded after the build)"
    )


if _module is not None:
    _load_error = torch_mismatch(_module.build_info()["torch_version"], torch.__version__)


def is_loaded() -> bool:
    """True when the compiled library loaded, matches the running torch and its ops are registered."""
    return _module is not None and _load_error is None


def require() -> ModuleType:
    """Return the compiled module, or raise a RuntimeError saying why it is missing and what to do."""
    if _module is None or _load_error is not None:
        raise RuntimeError(
            f"fisher_fast's compiled library could not be loaded ({_load_error}). {_BUILD_HELP}"
        )
    return _module


def build_info() -> dict[str, Any]:
    """Versions, compilers, compiled kernels (CPU; CUDA and its architectures) and OpenMP threads
    of this build: ``cxx_compiler`` is the C++ compiler, ``cuda_compiler`` nvcc's version and
    ``cuda_host_compiler`` the host compiler nvcc ran (both empty without CUDA);
    ``running_torch_version`` is the torch of this process, which must equal the
    ``torch_version`` the library was compiled against (a library that does not match is
    refused; its build_info still shows both)."""
    if _module is None:
        require()
    assert _module is not None
    return {**_module.build_info(), "running_torch_version": torch.__version__}
