#!/usr/bin/env bash
# One-shot GPU validation, run on a lent GPU machine from the repository root:
# builds the extension with its CUDA kernels against that machine's torch, runs the CUDA-marked
# tests (`pytest -m cuda`, without -x so that every failure shows), then
# benchmarks/gpu_check.py (CUDA vs CPU/float64 references, GPT-2 layers, Algorithm 1, timings).
#
# The whole run keeps to one budget, BUDGET_S seconds (default 450: under 8 minutes with what
# comes before and after): each step gets a share of what is left, and the check shares its
# own among its sections. $OUT/results.txt gets each step's and each section's results as soon
# as it finishes, so a run cut short keeps what it measured; the full logs are $OUT/*.txt too.
# Output goes to stdout and, when $OUT is set, to $OUT/*.txt.
#
# Wheels in $PEER_WHEELS (default peer-wheels/; the GPU machine has no network) are installed
# first: BackPACK and Opacus for the peer timings, and scikit-learn with its dependencies for
# Algorithm 1 on the embedded digits (without it the check writes stand-in digits).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/fisher_fast_device}"
mkdir -p "$out"
py="${PYTHON:-python3}"
budget="${BUDGET_S:-450}"
t0=$(date +%s)
results="$out/results.txt"
: >"$results"

left() { echo $((budget - ($(date +%s) - t0))); }
# share PERCENT CAP: PERCENT of the seconds left, at most CAP, at least 1
share() {
  local s=$(($(left) * $1 / 100))
  ((s > $2)) && s=$2
  ((s < 1)) && s=1
  echo "$s"
}
note() { echo "== $*" | tee -a "$results"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/machine.txt"
cat "$out/machine.txt" >>"$results"

# The CUDA toolkit image may lack some headers torch includes (e.g. cusparse.h); the pip CUDA
# wheels beside torch carry them.
nv="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')"
for inc in "$nv"/*/include "$nv"/*/*/include; do [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"; done

wheels="${PEER_WHEELS:-peer-wheels}"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -n 3
  note "wheels from $wheels: $(ls "$wheels"/*.whl | wc -l) installed"
fi

start=$(date +%s)
FISHER_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  timeout "$(share 60 300)" "$py" setup.py -q build_ext --inplace >"$out/build.txt" 2>&1
build_rc=$?
tail -n 30 "$out/build.txt"
note "build: rc=$build_rc in $(($(date +%s) - start)) s, $(left) s left"
[ "$build_rc" -eq 0 ] || exit "$build_rc"
"$py" -c "import fisher_fast, json; print(json.dumps(fisher_fast.build_info()))" | tee -a "$out/machine.txt" "$results"

# pytest -m cuda: a third of what is left (at most 150 s); every test's line in the log.
start=$(date +%s)
timeout "$(share 33 150)" "$py" -m pytest tests -v -p no:cacheprovider -m cuda --durations=10 \
  >"$out/pytest_cuda.txt" 2>&1
test_rc=$?
tail -n 40 "$out/pytest_cuda.txt"
{
  grep -E "^(FAILED|ERROR)" "$out/pytest_cuda.txt"
  tail -n 1 "$out/pytest_cuda.txt"
} >>"$results"
note "pytest -m cuda: rc=$test_rc in $(($(date +%s) - start)) s$([ "$test_rc" -eq 124 ] && echo ' (stopped: its share of the budget)'), $(left) s left"

# gpu_check: everything left but a few seconds; it shares them out among its sections.
check_s=$(($(left) - 5))
start=$(date +%s)
timeout "$((check_s + 15))" "$py" benchmarks/gpu_check.py --budget-s "$check_s" --results "$results" \
  2>&1 | tee "$out/gpu_check.txt" | tail -n 80
check_rc=${PIPESTATUS[0]}
note "gpu_check: rc=$check_rc in $(($(date +%s) - start)) s; whole run $(($(date +%s) - t0)) s of $budget"
echo "cuda tests rc=$test_rc, gpu_check rc=$check_rc"
[ "$test_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
