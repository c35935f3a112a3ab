#!/usr/bin/env bash
# Copies the repository's sources (no git data, environments, build outputs or caches) into
# DEST, for builds against another torch that must not touch the work tree.
#
# Usage: copy_sources.sh DEST
set -euo pipefail
if [ "$#" -ne 1 ]; then
  echo "usage: $0 DEST" >&2
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./runs \
  --exclude='*.egg-info' --exclude='*.so' --exclude=__pycache__ --exclude=.pytest_cache \
  -cf - . | tar -C "$1" -xf -
