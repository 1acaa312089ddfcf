#!/usr/bin/env bash
# Launch `python -m jaxalign.train` on every worker of a Cloud TPU pod slice.
#
#   tools/launch_tpu_pod.sh [--project P] [--sync] TPU_NAME ZONE -- --config configs/dpo.py --config.key=value ...
#
# Every worker (host) of the slice runs the same command at the same time; JAX finds the other
# workers through the TPU metadata (jaxalign.parallel.initialize_distributed auto-detects a
# Cloud TPU VM and calls jax.distributed.initialize() with no arguments). Checkpoints must go
# to storage all workers share (e.g. a gs:// bucket): every process writes its own shards.
#
# Options:
#   --project P   gcloud project (default: gcloud's configured project)
#   --sync        copy this checkout (git archive of HEAD) to $REPO_DIR on every worker first
# Environment:
#   REPO_DIR      checkout location on the workers (default: jaxalign, relative to the home directory)
#   PYTHON        interpreter on the workers (default: python3); its environment must have jaxalign's
#                 dependencies and jax[tpu] installed
#   EXTRA_ENV     extra "VAR=value ..." assignments for the training command (e.g. "XLA_FLAGS=...")
#
# This script cannot be exercised here (no TPU); the multi-process code path it relies on is
# tested on CPU by tests/parallel/test_multiprocess.py.
set -euo pipefail

usage() { sed -n '2,4p' "$0" >&2; exit 2; }

project=()
sync=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project=(--project "$2"); shift 2 ;;
    --sync) sync=1; shift ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage
tpu="$1"; zone="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "launch_tpu_pod.sh: no training arguments after --" >&2; usage; }

repo_dir="${REPO_DIR:-jaxalign}"
python="${PYTHON:-python3}"
gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all)

if [[ "$sync" == 1 ]]; then
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="$(mktemp -t jaxalign.XXXXXX.tar.gz)"
  trap 'rm -f "$archive"' EXIT
  git -C "$root" archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$tpu:jaxalign.tar.gz" --zone "$zone" "${project[@]}" --worker=all
  "${gcloud_ssh[@]}" --command "mkdir -p $(printf %q "$repo_dir") && tar -xzf jaxalign.tar.gz -C $(printf %q "$repo_dir")"
fi

# Quote every training argument for the remote shell.
train_args="$(printf ' %q' "$@")"
remote="cd $(printf %q "$repo_dir") && ${EXTRA_ENV:+$EXTRA_ENV }$(printf %q "$python") -m jaxalign.train${train_args}"
echo "[launch_tpu_pod] on all workers of $tpu ($zone): $remote" >&2
exec "${gcloud_ssh[@]}" --command "$remote"
