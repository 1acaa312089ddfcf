#!/usr/bin/env bash
# Creates .venv (once) and installs jaxalign with its test and parity extras.
# Sourced by tools/quickstart.sh and tools/test.sh; safe to run again (skips when up to date).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXALIGN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.jaxalign-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[jaxalign] installing dependencies into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned to the CPU build, so trl does not pull a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,parity]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
