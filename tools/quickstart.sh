#!/usr/bin/env bash
# The quickstart: a complete small preference-alignment job on CPU, no downloads.
#
#   bash tools/quickstart.sh [--config.KEY=VALUE ...]
#
# Sets up .venv (first run), then trains DPO on a tiny local model (written to runs/tiny-model
# if absent) with the synthetic preference task of configs/quickstart.py, evaluates held-out
# pairs, checkpoints, exports the model in Hugging Face format and plots the curves.
# Running it again resumes (or, when finished, re-exports) the same run in runs/quickstart.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
WORKDIR="${JAXALIGN_QUICKSTART_DIR:-runs/quickstart}"
python -m jaxalign.train --config configs/quickstart.py --workdir "$WORKDIR" "$@"
PLOT="$(python tools/plot_metrics.py "$WORKDIR")"
echo "plot:          $PLOT"
