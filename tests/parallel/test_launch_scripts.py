"""The launch scripts, run against stand-ins for gcloud / scontrol / srun / python.

Real TPU pods and SLURM clusters are not available here; these tests check that each script
builds the right per-worker command (quoting included) and the right JAX environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    return d


def run(script: str, args: list[str], bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(bin_dir.parent), **env}
    return subprocess.run(["bash", str(ROOT / "tools" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def test_tpu_pod_runs_the_trainer_on_all_workers(bin_dir):
    log = bin_dir.parent / "gcloud.log"
    stub(bin_dir, "gcloud", f'printf "%s\\n" "$@" > {log}\n')
    result = run("launch_tpu_pod.sh", ["--project", "proj", "my-tpu", "us-central2-b", "--",
                                       "--config", "configs/dpo.py", "--config.run_name=a b"], bin_dir)
    assert result.returncode == 0, result.stderr
    argv = log.read_text().splitlines()
    assert argv[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--project"]
    assert "--worker=all" in argv
    command = argv[argv.index("--command") + 1]
    assert command == "cd jaxalign && python3 -m jaxalign.train --config configs/dpo.py --config.run_name=a\\ b"
    # the remote shell sees the argument with its space intact
    words = subprocess.run(["bash", "-c", 'set -- ' + command.split("jaxalign.train", 1)[1] + '; printf "%s\\n" "$@"'],
                           capture_output=True, text=True).stdout.splitlines()
    assert words == ["--config", "configs/dpo.py", "--config.run_name=a b"]


def test_tpu_pod_needs_training_arguments(bin_dir):
    stub(bin_dir, "gcloud", "exit 0\n")
    result = run("launch_tpu_pod.sh", ["my-tpu", "zone"], bin_dir)
    assert result.returncode == 2 and "no training arguments" in result.stderr


@pytest.mark.parametrize("per_gpu", ["0", "1"])
def test_slurm_sets_coordinator_count_and_rank(bin_dir, per_gpu):
    stub(bin_dir, "scontrol", 'echo gpu-node-07; echo gpu-node-08\n')
    # srun stand-in: two tasks, ranks 0 and 1, each on local rank 0 and 1
    stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                          'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" || exit $?; done\n')
    stub(bin_dir, "fakepython", 'echo "rank=$JAX_PROCESS_ID of=$JAX_NUM_PROCESSES at=$JAX_COORDINATOR_ADDRESS '
                                'local=${JAX_LOCAL_DEVICE_IDS:-all} argv=$*"\n')
    result = run("launch_slurm.sh", ["--config", "configs/dpo.py", "--config.mesh.fsdp=-1"], bin_dir,
                 SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS="2",
                 SLURM_JOB_NUM_NODES="2", PYTHON=str(bin_dir / "fakepython"), PER_GPU=per_gpu)
    assert result.returncode == 0, result.stderr
    port = 12000 + 4242 % 20000
    expected_local = ["0", "1"] if per_gpu == "1" else ["all", "all"]
    assert result.stdout.splitlines() == [
        f"rank={i} of=2 at=gpu-node-07:{port} local={expected_local[i]} "
        "argv=-m jaxalign.train --config configs/dpo.py --config.mesh.fsdp=-1"
        for i in range(2)
    ]


def test_slurm_outside_a_job_is_refused(bin_dir):
    result = run("launch_slurm.sh", ["--config", "x.py"], bin_dir)
    assert result.returncode == 2 and "submit with sbatch" in result.stderr
