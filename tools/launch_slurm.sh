#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one JAX process per node (default) or per GPU.
#
#   sbatch --nodes=4 tools/launch_slurm.sh --config configs/dpo.py --config.key=value ...
#   PER_GPU=1 sbatch --nodes=4 --ntasks-per-node=8 tools/launch_slurm.sh --config ...
#
# The coordinator is the first node of the allocation; every task gets JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID, which jaxalign.parallel.initialize_distributed reads
# (explicitly, so JAX's own SLURM detection does not restrict a per-node process to one GPU).
# Checkpoints must go to a file system all nodes share: every process writes its own shards.
#
# Environment:
#   PYTHON          interpreter (default: python3, from the environment the job inherits)
#   PER_GPU=1       one process per GPU (needs --ntasks-per-node = GPUs per node, every task
#                   seeing all GPUs of its node, i.e. no --gpus-per-task); process i of a node
#                   then uses only GPU $SLURM_LOCALID (JAX_LOCAL_DEVICE_IDS)
#   COORDINATOR_PORT  coordinator port (default: 12000 + SLURM_JOB_ID % 20000)
#
# This script cannot be exercised here (no cluster); the multi-process code path it relies on
# is tested on CPU by tests/parallel/test_multiprocess.py.
#
#SBATCH --job-name=jaxalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=jaxalign-%j.out
set -euo pipefail

[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "launch_slurm.sh: submit with sbatch (no SLURM_JOB_ID)" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch_slurm.sh: pass the training arguments, e.g. --config configs/dpo.py" >&2; exit 2; }

# (read all names: `| head -n 1` would SIGPIPE scontrol and, under pipefail, fail the job)
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node="${nodes[0]:-}"
[[ -n "$head_node" ]] || { echo "launch_slurm.sh: scontrol gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1; }
port="${COORDINATOR_PORT:-$((12000 + SLURM_JOB_ID % 20000))}"
export JAX_COORDINATOR_ADDRESS="$head_node:$port"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export PYTHON="${PYTHON:-python3}"
export PER_GPU="${PER_GPU:-0}"
echo "[launch_slurm] $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes, coordinator $JAX_COORDINATOR_ADDRESS" >&2

# Per task: the rank comes from SLURM_PROCID, known only inside the task.
srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID="$SLURM_PROCID"
  if [[ "$PER_GPU" == 1 ]]; then export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; fi
  exec "$PYTHON" -m jaxalign.train "$@"
' launch_slurm "$@"
