"""Tests of the compiled library's loader (fisher_fast._library) and of build_info()."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import fisher_fast


def test_build_info_keys_and_types() -> None:
    info = fisher_fast.build_info()
    types = {
        "version": str,
        "torch_version": str,
        "cpu_kernels": bool,
        "cuda_kernels": bool,
        "cuda_version": str,
        "cuda_arch_list": str,
        "debug": bool,
        "num_threads": int,
        "running_torch_version": str,
        "cxx_compiler": str,
        "cuda_compiler": str,
        "cuda_host_compiler": str,
    }
    assert set(info) == set(types)
    for key, expected in types.items():
        assert isinstance(info[key], expected), f"{key}: {info[key]!r} is not {expected.__name__}"
    assert info["version"] == fisher_fast.__version__
    assert info["torch_version"] == torch.__version__  # built against the torch it runs with
    assert info["running_torch_version"] == torch.__version__
    assert info["cpu_kernels"] is True
    assert info["num_threads"] == torch.get_num_threads()
    if info["cuda_kernels"]:
        assert info["cuda_version"] == torch.version.cuda
        assert info["cuda_arch_list"]
        assert info["cuda_compiler"].startswith("nvcc ")
        assert info["cuda_host_compiler"] == info["cxx_compiler"]  # nvcc ran with -ccbin
    else:
        assert info["cuda_version"] == "" and info["cuda_arch_list"] == ""
        assert info["cuda_compiler"] == "" and info["cuda_host_compiler"] == ""
    assert info["cxx_compiler"].split()[0] in ("gcc", "clang", "icx", "msvc")


def test_library_is_loaded_and_ops_are_registered() -> None:
    assert fisher_fast.is_loaded()
    for name in ("frechet_sums", "per_sample_sq_sum"):
        assert hasattr(torch.ops.fisher_fast, name)


# Runs in a fresh interpreter in which `import fisher_fast._C` fails, as in a source checkout that
# was never built: the package must import, and every op must say what failed and how to build.
MISSING_LIBRARY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoCompiledLibrary(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fisher_fast._C":
                raise ImportError("simulated: no compiled library")
            return None

    sys.meta_path.insert(0, NoCompiledLibrary())
    import torch
    import fisher_fast

    errors = {}
    calls = {
        "build_info": lambda: fisher_fast.build_info(),
        "frechet_distance": lambda: fisher_fast.frechet_distance(torch.ones(3), torch.ones(3)),
        "per_sample_sq_sum": lambda: fisher_fast.ops.per_sample_sq_sum(
            torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        ),
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except Exception as exc:
            errors[name] = [type(exc).__name__, str(exc)]
    print(json.dumps({"is_loaded": fisher_fast.is_loaded(), "errors": errors}))
    """
)


def test_missing_library_fails_at_first_use_with_build_instructions() -> None:
    run = subprocess.run(
        [sys.executable, "-c", MISSING_LIBRARY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["is_loaded"] is False
    for name, error in result["errors"].items():
        assert error is not None, f"{name} ran without the compiled library"
        kind, message = error
        assert kind == "RuntimeError", f"{name}: {kind}: {message}"
        assert "compiled library could not be loaded" in message
        assert "simulated: no compiled library" in message  # the cause is passed on
        assert "pip install --no-build-isolation" in message  # and how to build


# A fresh interpreter whose torch reports another version than the one the library was compiled
# against, as after `pip install .` compiled against a torch downloaded into an isolated build
# environment: the library is refused, and build_info shows both versions.
OTHER_TORCH_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    built = torch.__version__
    torch.__version__ = "9.9.9+other"
    import fisher_fast
    info = fisher_fast.build_info()
    try:
        fisher_fast.frechet_distance(torch.ones(3), torch.ones(3))
        error = None
    except RuntimeError as exc:
        error = str(exc)
    print(json.dumps({"is_loaded": fisher_fast.is_loaded(), "built": built, "info": info,
                      "error": error}))
    """
)


def test_library_built_against_another_torch_is_refused_with_both_versions() -> None:
    run = subprocess.run(
        [sys.executable, "-c", OTHER_TORCH_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["is_loaded"] is False
    assert result["info"]["torch_version"] == result["built"]
    assert result["info"]["running_torch_version"] == "9.9.9+other"
    error = result["error"]
    assert error is not None, "an op ran on a library built against another torch"
    assert f"compiled against torch {result['built']}" in error and "9.9.9+other" in error
    assert "--no-build-isolation" in error
