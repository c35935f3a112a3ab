#!/usr/bin/env bash
# Runs pytest and turns "no tests were collected" (exit code 5) into an explicit failure, so a
# broken test discovery can never pass, or fail, silently.
set -uo pipefail
py="$1"; shift
"$py" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests from: $*" >&2
  exit 1
fi
exit "$rc"
