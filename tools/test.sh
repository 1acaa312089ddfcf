#!/usr/bin/env bash
# Sets up the environment (first run) and runs the whole test suite.
# pytest's own exit status is returned: 5 (no tests collected) fails like any other error.
# Test files are spread over TEST_WORKERS processes (default 2, one per core of the CI machine);
# a later "-n 0" in the arguments runs everything in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
