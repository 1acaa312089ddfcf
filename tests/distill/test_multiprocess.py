"""ADPA on two ``jax.distributed`` processes (4 fake devices each) against one process with 8:
its caches (the student's greedy states, the teachers' candidates and advantages: the sampler
and the teacher passes DCKD's top-k shares), built from each process's shard of the pairs and
written by process 0, hold the same numbers, and the students end the same."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.data.store import ArrayStore
from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.train.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(root, workdir) -> list[str]:
    """ADPA, 2 SGD steps of 8 pairs over a (data=2, fsdp=2, tensor=2) mesh."""
    return ["--config", os.path.join(ROOT, "configs", "adpa.py"), "--workdir", str(workdir),
            f"--config.compilation_cache_dir={root / 'compilation_cache'}",
            f"--config.model.path={root / 'student'}", f"--config.distill.teacher={root / 'teacher'}",
            f"--config.distill.teacher_reference={root / 'teacher_reference'}", "--config.distill.max_new_tokens=8",
            "--config.data.train=synthetic", "--config.data.synthetic_pairs=24", "--config.data.eval_pairs=0",
            "--config.data.max_length=64", "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
            "--config.data.batch_size=8", "--config.data.micro_batch_size=8", "--config.steps=2",
            "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.5",
            "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.log_every=1",
            "--config.checkpoint.export=True", "--config.progress_bar=False", "--config.huge_pages=False",
            "--config.model.dtype=float32"]


def _cache_arrays(workdir) -> dict[str, np.ndarray]:
    root = os.path.join(workdir, "distill_cache")
    return {f"{entry.split('-')[0]}/{name}": np.asarray(value)
            for entry in sorted(os.listdir(root))
            for name, value in sorted(ArrayStore(os.path.join(root, entry)).read().items())}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_build_the_adpa_caches_and_distil_like_one(tmp_path):
    records = synthetic_records(32, seed=0)
    corpus = [r["prompt"] + r[s] for r in records for s in ("chosen", "rejected")]
    for seed, name in enumerate(("student", "teacher_reference", "teacher")):
        write_tiny_checkpoint(tmp_path / name, seed=seed, hidden_size=32, intermediate_size=64, num_layers=1,
                              num_kv_heads=2, max_position=64, corpus=corpus, bpe_vocab_size=300)
    assert main(["jaxalign.train", *_flags(tmp_path, tmp_path / "one")]) == 0

    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(tmp_path / f"process{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxalign.train", *_flags(tmp_path, tmp_path / "two"),
             f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
             f"--config.distributed.process_id={i}", "--config.distributed.initialization_timeout=60"],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    try:
        for i, proc in enumerate(procs):
            assert proc.wait(timeout=TIMEOUT) == 0, open(tmp_path / f"process{i}.log").read()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    one, two = (_cache_arrays(tmp_path / run) for run in ("one", "two"))
    assert one.keys() == two.keys() and {key.split("/")[0] for key in one} == {"adpa", "advantages"}
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-5, err_msg=key)
    a = load_file(str(tmp_path / "one" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "export" / "model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
