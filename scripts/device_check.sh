#!/usr/bin/env bash
# One-shot GPU validation, run on a lent GPU machine from the repository root:
# builds the extension with its CUDA kernels against that machine's torch, runs every test
# (CUDA-marked ones included), then benchmarks/gpu_check.py (CUDA vs CPU/reference, timings).
# Output goes to stdout and, when $OUT is set, to $OUT/*.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/fisher_fast_device}"
mkdir -p "$out"
py="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/machine.txt"

# The CUDA toolkit image may lack some headers torch includes (e.g. cusparse.h); the pip CUDA
# wheels beside torch carry them.
nv="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')"
for inc in "$nv"/*/include "$nv"/*/*/include; do [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"; done

# The peers timed by gpu_check (BackPACK, Opacus and their pure-Python dependencies), from
# wheels carried along in $PEER_WHEELS (the GPU machine has no network); without them the
# check reports those peers as failed and times the rest.
wheels="${PEER_WHEELS:-peer-wheels}"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -n 3
fi

start=$(date +%s)
FISHER_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$py" setup.py -q build_ext --inplace >"$out/build.txt" 2>&1
build_rc=$?
tail -n 30 "$out/build.txt"
echo "build rc=$build_rc in $(( $(date +%s) - start )) s"
[ "$build_rc" -eq 0 ] || exit "$build_rc"
"$py" -c "import fisher_fast, json; print(json.dumps(fisher_fast.build_info()))" | tee -a "$out/machine.txt"

timeout "${TEST_TIMEOUT:-240}" "$py" -m pytest tests -q -x -p no:cacheprovider -m cuda 2>&1 | tail -n 15 | tee "$out/pytest_cuda.txt"
test_rc=${PIPESTATUS[0]}
timeout "${CHECK_TIMEOUT:-280}" "$py" benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt" | tail -n 60
check_rc=${PIPESTATUS[0]}
echo "cuda tests rc=$test_rc, gpu_check rc=$check_rc"
[ "$test_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
