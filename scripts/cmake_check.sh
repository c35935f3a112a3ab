#!/usr/bin/env bash
# Configures the C++ op library and its example with CMake in a temporary build directory,
# builds them (ninja when found on PATH or beside PYTHON, else make) and runs the example, which
# checks a hand-computed distance. Usage: scripts/cmake_check.sh PYTHON (a python with torch).
set -euo pipefail
py="${1:?usage: scripts/cmake_check.sh PYTHON}"
# Absolute, but not through symlinks: a venv's python links to an interpreter without torch.
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$(mktemp -d "${TMPDIR:-/tmp}/fisher_fast_cmake.XXXXXX")"
trap 'rm -rf "$build"' EXIT

ninja="$(command -v ninja || true)"
if [ -z "$ninja" ] && [ -x "$(dirname "$py")/ninja" ]; then
  ninja="$(dirname "$py")/ninja"
fi
generator=()
if [ -n "$ninja" ]; then
  generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ninja")
fi

cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$py"
cmake --build "$build" --parallel
"$build/distance_demo"
