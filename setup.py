"""Build of fisher_fast's compiled library (fisher_fast._C).

The C++ CPU kernels are always compiled. The CUDA kernels are compiled when torch is a CUDA build
and nvcc is found, or when forced. Environment switches:

* ``FISHER_FAST_CUDA=1`` forces the CUDA kernels (error if no CUDA toolkit), ``=0`` skips them.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``) picks the GPU architectures, as in torch itself.
* ``FISHER_FAST_DEBUG=1`` compiles with ``-O0 -g`` (and ``-G`` for CUDA) for debuggers.
* ``FISHER_FAST_EXTENSION=0`` installs the Python package without compiling (see ``extensions``).
* ``CXX`` picks the C++ compiler (as in torch's build helpers); nvcc is given the same one as its
  host compiler (``-ccbin``), so that one C++ runtime serves the whole library.

Flags kept equal to CMakeLists.txt's: ``-fopenmp -fno-math-errno -fvisibility=hidden`` for C++
(plus ``-fwrapv``, which Python's own compile flags bring here and CMake adds; the code does its
size arithmetic checked and does not rely on it), and for nvcc no fast math, so float32 and
bfloat16 subnormals are kept as on the CPU.
"""

from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

NO_TORCH = """fisher_fast compiles against the torch of the environment it is installed into, and
none was found. Install torch first, then build without pip's build isolation:
    pip install torch
    pip install --no-build-isolation ."""


def import_target_torch():
    """Import the torch of the environment being installed into.

    Under pip's default build isolation the build runs with only the build requirements on
    ``sys.path`` (torch is deliberately not one of them: pip would download a different torch,
    often a multi-GB CUDA build, and compile against it). The interpreter is still the target
    environment's, so its site-packages are found from ``sysconfig`` and searched for torch.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    paths = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    found = [p for p in dict.fromkeys(paths) if (Path(p) / "torch" / "__init__.py").is_file()]
    if not found:
        sys.exit(NO_TORCH)
    sys.path.extend(found)  # after the build requirements, so that they keep precedence
    import torch

    print(f"fisher_fast: building against torch {torch.__version__} from {found[0]}")
    return torch


torch = import_target_torch()
from torch.utils.cpp_extension import (  # noqa: E402 (needs the torch found above)
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    get_cxx_compiler,
)

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fisher_fast/_version.py").read_text())[1]


def want_cuda() -> bool:
    """Decide whether to compile the CUDA kernels (see the module docstring)."""
    switch = os.environ.get("FISHER_FAST_CUDA", "").strip()
    available = torch.cuda.is_available() and CUDA_HOME is not None
    if switch == "1":
        if CUDA_HOME is None or not torch.backends.cuda.is_built():
            raise RuntimeError(
                "FISHER_FAST_CUDA=1 but no CUDA toolkit was found or torch is a CPU build "
                f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME}); install a CUDA build of torch "
                "and put nvcc on PATH, or unset FISHER_FAST_CUDA."
            )
        return True
    if switch == "0":
        return False
    if switch:
        raise RuntimeError(f"FISHER_FAST_CUDA must be 0 or 1, got {switch!r}")
    return available


def cuda_arch_list() -> str:
    """The architectures nvcc compiles for, as torch's build helpers will choose them."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "native or torch default"


def extension():
    debug = os.environ.get("FISHER_FAST_DEBUG", "0") == "1"
    with_cuda = want_cuda()
    sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    sources += sorted(str(p) for p in Path("csrc/cpu").glob("*.cpp"))
    # -g0: Python's own compile flags (which torch's build helpers pass on) carry -g, and debug
    # information for torch's headers makes every file compile markedly slower and the library
    # several times larger.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    macros = [
        ("FISHER_FAST_VERSION", f'"{VERSION}"'),
        ("FISHER_FAST_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    if debug:
        macros.append(("FISHER_FAST_DEBUG", "1"))
    # -fopenmp at compile time only: at::parallel_for is an inline OpenMP loop (serial without
    # it), and its GOMP_* calls bind at load time to the OpenMP runtime torch itself loads.
    # Hidden visibility: the library exports only the Python module's init (and the names marked
    # FISHER_FAST_API), so its inline and template code never binds to another library's copy.
    cxx = [*opt, "-fopenmp", "-fno-math-errno", "-fvisibility=hidden"]
    kwargs = dict(
        name="fisher_fast._C",
        include_dirs=[str(ROOT / "csrc/include"), str(ROOT / "csrc")],
        define_macros=macros,
    )
    if not with_cuda:
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    sources += sorted(str(p) for p in Path("csrc/cuda").glob("*.cu"))
    macros += [
        ("FISHER_FAST_WITH_CUDA", "1"),
        ("FISHER_FAST_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("FISHER_FAST_CUDA_ARCHS", f'"{cuda_arch_list()}"'),
    ]
    # No --use_fast_math: it flushes float32 subnormals to zero (a negative subnormal FIM entry
    # would count as valid on the GPU but not on the CPU) and loosens division and square roots.
    nvcc = [
        *(["-O0", "-g", "-G"] if debug else ["-O3"]),
        "-ccbin",
        get_cxx_compiler(),
        "-Xcompiler=-fvisibility=hidden",
    ]
    return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


def extensions():
    """The compiled library, unless ``FISHER_FAST_EXTENSION=0`` (``make build`` registers the
    package that way, then compiles with ``setup.py build_ext --inplace``: incremental, so an
    unchanged source tree rebuilds nothing)."""
    switch = os.environ.get("FISHER_FAST_EXTENSION", "1").strip()
    if switch not in ("0", "1"):
        raise RuntimeError(f"FISHER_FAST_EXTENSION must be 0 or 1, got {switch!r}")
    return [extension()] if switch == "1" else []


setup(
    version=VERSION,
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
