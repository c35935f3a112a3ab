#!/usr/bin/env bash
# Compile check of the CUDA kernels on a machine without a GPU: `make cuda-check`.
#
# Usage: cuda_compile_check.sh VENV TORCH_SPEC ARCHS
#   VENV        virtual environment for a CUDA build of torch, outside the repository; created,
#               or reused when it already holds TORCH_SPEC (cuda_torch_venv.sh)
#   TORCH_SPEC  pip requirement of a CUDA build of torch (e.g. torch==2.14.1)
#   ARCHS       TORCH_CUDA_ARCH_LIST to compile for (e.g. "8.0;9.0")
#
# The repository is copied to a temporary folder and built there with FISHER_FAST_CUDA=1, so
# nothing is written into the work tree. nvcc's ptxas reports registers, shared memory and spills
# of every kernel (-Xptxas -v). Any compile or link error fails the script. Set KEEP_BUILD=1 to
# keep the temporary folder for inspection.
set -euo pipefail

if [ "$#" -ne 3 ]; then
  echo "usage: $0 VENV TORCH_SPEC ARCHS" >&2
  exit 2
fi
venv="$1"
torch_spec="$2"
archs="$3"
repo="$(cd "$(dirname "$0")/.." && pwd)"

# nvcc and the toolkit: torch's build helpers look for CUDA_HOME; a wrapper script on PATH would
# otherwise make them guess the wrong root.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  else
    nvcc_path="$(command -v nvcc || true)"
    if [ -z "$nvcc_path" ]; then
      echo "error: nvcc not found; install a CUDA toolkit or set CUDA_HOME" >&2
      exit 1
    fi
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")"
    export CUDA_HOME
  fi
fi
export PATH="$CUDA_HOME/bin:$PATH"

bash "$(dirname "$0")/cuda_torch_venv.sh" "$venv" "$torch_spec"
py="$venv/bin/python"
nvcc --version | tail -n 2

# Build in a copy of the sources, outside the repository.
work="$(mktemp -d "${TMPDIR:-/tmp}/fisher_fast_cuda_check.XXXXXX")"
if [ "${KEEP_BUILD:-0}" = "1" ]; then
  echo "cuda-check: keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi
bash "$repo/scripts/copy_sources.sh" "$work"
mkdir -p "$work/_build/temp" "$work/_build/lib"

cd "$work"
export FISHER_FAST_CUDA=1
export TORCH_CUDA_ARCH_LIST="$archs"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v"
# A minimal toolkit may lack the CUDA library headers that torch's headers include (cusparse.h,
# cublas_v2.h); the pip wheels that came with torch ship them.
for inc in "$venv"/lib/python*/site-packages/nvidia/cu*/include; do
  if [ -d "$inc" ]; then
    export CPATH="$inc${CPATH:+:$CPATH}"
    NVCC_APPEND_FLAGS="$NVCC_APPEND_FLAGS -I$inc"
  fi
done
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$py" setup.py -q build_ext --build-temp _build/temp --build-lib _build/lib 2>&1 |
  tee "$work/build.log"

so="$(find _build/lib -name '_C*.so' | head -n 1)"
if [ -z "$so" ]; then
  echo "error: the build produced no fisher_fast/_C*.so" >&2
  exit 1
fi
# The CUDA kernels must be in the library: it then calls the CUDA runtime to launch them.
if [ "$(nm -DC "$so" | grep -c 'cudaLaunchKernel' || true)" = "0" ]; then
  echo "error: $so launches no CUDA kernel; were the .cu files compiled?" >&2
  exit 1
fi

spills="$(grep -cE 'bytes spill (stores|loads)' build.log || true)"
nonzero="$(grep -cE '(^|[^0-9])[1-9][0-9]* bytes spill (stores|loads)' build.log || true)"
echo "cuda-check: OK: CUDA kernels compiled for TORCH_CUDA_ARCH_LIST=\"$archs\" against" \
  "torch $("$py" -c 'import torch; print(torch.__version__)') ($spills ptxas spill reports," \
  "$nonzero with nonzero spills)"
