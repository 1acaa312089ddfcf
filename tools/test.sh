#!/usr/bin/env bash
# Sets up the environment (first run) and runs the whole test suite.
# pytest's own exit status is returned: 5 (no tests collected) fails like any other error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
