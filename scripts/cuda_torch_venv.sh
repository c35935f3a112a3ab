#!/usr/bin/env bash
# Creates, or reuses, the second environment: a CUDA build of torch in its own virtual
# environment outside the repository, for `make cuda-check` and `make timm-check`.
#
# Usage: cuda_torch_venv.sh VENV TORCH_SPEC [PACKAGE ...]
#   VENV        the virtual environment (e.g. ~/.cache/fisher_fast/cuda-venv)
#   TORCH_SPEC  pip requirement of a CUDA build of torch (e.g. torch==2.14.1)
#   PACKAGE     further pip requirements, installed when one of them is missing
#
# The environment is reused when its stamp names the same torch spec and torch imports as a
# CUDA build; otherwise it is (re)installed. Pinned extra packages are checked by name and
# version and installed only when they differ.
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 VENV TORCH_SPEC [PACKAGE ...]" >&2
  exit 2
fi
venv="$1"
torch_spec="$2"
shift 2
stamp="$venv/.fisher_fast_torch_spec"
py="$venv/bin/python"
if [ -x "$py" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$torch_spec" ] &&
  "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "second environment: reusing $venv ($torch_spec)"
else
  echo "second environment: installing $torch_spec into $venv (first run takes a few minutes)"
  mkdir -p "$(dirname "$venv")"
  test -x "$py" || "${PYTHON:-python3}" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "$torch_spec" pybind11 ninja numpy setuptools wheel
  "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" || {
    echo "error: $torch_spec installed a CPU build of torch; give a CUDA build" >&2
    exit 1
  }
  echo "$torch_spec" >"$stamp"
fi
if [ "$#" -gt 0 ]; then
  # `pip install` of requirements already met is quick, but prints nothing useful: check first.
  if ! "$py" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for spec in sys.argv[1:]:
    name, _, wanted = spec.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if wanted and have.split("+")[0] != wanted:
        sys.exit(1)
PY
  then
    echo "second environment: installing $*"
    "$py" -m pip install -q "$@"
  fi
fi
"$py" -c "import torch; print(f'second environment: torch {torch.__version__}, CUDA {torch.version.cuda}')"
