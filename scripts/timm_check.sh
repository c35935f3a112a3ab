#!/usr/bin/env bash
# The timm real-model tests (tests/test_fim_timm.py) and the Triton kernels' tests
# (tests/test_triton_products.py, tests/test_triton_conv.py) in the second environment: `make timm-check`.
#
# Usage: timm_check.sh VENV TORCH_SPEC
#   VENV        the second environment (cuda_torch_venv.sh), shared with `make cuda-check`
#   TORCH_SPEC  its torch (e.g. torch==2.14.1, a CUDA build that also runs on the CPU)
#
# timm needs torchvision, and PyPI's torchvision does not import beside the CPU torch of the
# main environment; torch 2.14.1 with torchvision 0.29.1 does. The sources are copied to a
# temporary folder, the library is compiled there against that torch (CPU kernels only) and the
# tests run on the CPU, with FISHER_FAST_REQUIRE_TIMM=1 and FISHER_FAST_REQUIRE_TRITON=1 so that
# a missing timm or Triton fails instead of skipping; the Triton kernel runs through Triton's
# interpreter (TRITON_INTERPRET=1), as there is no GPU; then every Triton kernel is compiled for
# sm_90 by Triton's real compiler and ptxas (scripts/triton_compile_check.py), which the
# interpreter does not exercise. Extra pytest arguments come from PYTEST_ARGS.
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 VENV TORCH_SPEC" >&2
  exit 2
fi
venv="$1"
torch_spec="$2"
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$venv/bin/python"

bash "$repo/scripts/cuda_torch_venv.sh" "$venv" "$torch_spec" \
  torchvision==0.29.1 timm==1.0.29 pytest==9.2.0 safetensors==0.8.0 tqdm==4.70.1

work="$(mktemp -d "${TMPDIR:-/tmp}/fisher_fast_timm_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
bash "$repo/scripts/copy_sources.sh" "$work"
cd "$work"
echo "timm-check: compiling against $("$py" -c 'import torch; print(torch.__version__)')"
FISHER_FAST_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" setup.py -q build_ext --inplace >build.log 2>&1 || {
  tail -n 40 build.log >&2
  echo "error: the build against $torch_spec failed (log above)" >&2
  exit 1
}
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
FISHER_FAST_REQUIRE_TIMM=1 FISHER_FAST_REQUIRE_TRITON=1 TRITON_INTERPRET=1 PYTHONPATH="$work" \
  bash scripts/run_pytest.sh "$py" -p no:cacheprovider tests/test_fim_timm.py \
  tests/test_triton_products.py tests/test_triton_conv.py ${PYTEST_ARGS:-}
PYTHONPATH="$work" "$py" scripts/triton_compile_check.py --arch 90
