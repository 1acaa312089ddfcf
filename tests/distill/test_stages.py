"""ADPA+ as a chain of resumable stages: killed with SIGKILL inside each stage and resumed, it
ends with the parameters of an uninterrupted chain, bit for bit; with LoRA every stage trains
adapters only, on the model the previous stage exported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.train.cli import main
from jaxalign.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 180  # seconds for a subprocess to reach a step or to end
STEPS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A student, and an SFT teacher and DPO teacher that share its vocabulary (other seeds)."""
    records = synthetic_records(32, seed=0)
    corpus = [r["prompt"] + r[s] for r in records for s in ("chosen", "rejected")]
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("student", "teacher_reference", "teacher")):
        write_tiny_checkpoint(root / name, seed=seed, hidden_size=32, intermediate_size=64, num_layers=1,
                              num_kv_heads=2, max_position=64, corpus=corpus, bpe_vocab_size=300)
    return root


def _flags(models, workdir, *extra: str) -> list[str]:
    """``configs/adpa_plus.py`` on 24 synthetic pairs, ``STEPS`` steps of 4 pairs per stage; every
    run shares one compilation cache (beside the models)."""
    return ["--config", os.path.join(ROOT, "configs", "adpa_plus.py"), "--workdir", str(workdir),
            f"--config.compilation_cache_dir={models / 'compilation_cache'}",
            f"--config.model.path={models / 'student'}", f"--config.distill.teacher={models / 'teacher'}",
            f"--config.distill.teacher_reference={models / 'teacher_reference'}", "--config.distill.max_new_tokens=8",
            "--config.data.train=synthetic", "--config.data.synthetic_pairs=24", "--config.data.eval_pairs=0",
            "--config.data.max_length=64", "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
            "--config.data.batch_size=4", "--config.data.micro_batch_size=4", f"--config.steps={STEPS}",
            "--config.optimizer.learning_rate=1e-3", "--config.checkpoint_every=1", "--config.log_every=1",
            "--config.checkpoint.export=True", "--config.progress_bar=False", "--config.huge_pages=False",
            "--config.optimizer.warmup_steps=1", "--config.model.dtype=float32", "--config.mesh.data=1",
            "--config.mesh.fsdp=1", "--config.mesh.tensor=1", *extra]


def _logged_step(stage_dir) -> int:
    if not os.path.exists(os.path.join(stage_dir, "metrics.jsonl")):
        return 0
    try:
        return max((e["step"] for e in read_metrics(stage_dir) if "loss" in e), default=0)
    except ValueError:  # a line being written
        return 0


def _kill_at(argv: list[str], stage_dir, step: int, log) -> None:
    """Starts the pipeline and SIGKILLs it once ``stage_dir`` has logged ``step``."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "jaxalign.train", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while _logged_step(stage_dir) < step:
            assert proc.poll() is None, f"the pipeline exited ({proc.returncode}):\n{open(log).read()[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step} in {stage_dir}:\n{open(log).read()[-3000:]}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, "the pipeline ended before the kill"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_each_stage_resumes_after_kill_9_bit_exactly(models, tmp_path):
    assert main(["jaxalign.train", *_flags(models, tmp_path / "uninterrupted")]) == 0
    workdir = tmp_path / "killed"
    argv = _flags(models, workdir)
    _kill_at(argv, workdir / "stages" / "dckd", 2, tmp_path / "first.err")
    assert not (workdir / "stages" / "adpa").exists()
    _kill_at(argv, workdir / "stages" / "adpa", 2, tmp_path / "second.err")
    assert main(["jaxalign.train", *argv]) == 0
    for stage in ("dckd", "adpa"):
        expected = load_file(str(tmp_path / "uninterrupted" / "stages" / stage / "export" / "model.safetensors"))
        got = load_file(str(workdir / "stages" / stage / "export" / "model.safetensors"))
        assert [k for k in expected if not np.array_equal(expected[k], got[k])] == [], stage
        steps = [e["step"] for e in read_metrics(workdir / "stages" / stage) if "loss" in e]
        assert steps == list(range(1, STEPS + 1)), (stage, steps)


def test_adpa_plus_with_lora_trains_adapters_on_each_stage_start(models, tmp_path):
    targets = ("q_proj", "v_proj")
    workdir = tmp_path / "run"
    argv = _flags(models, workdir, "--config.lora.rank=4", f"--config.lora.targets={targets}", "--config.steps=2")
    assert main(["jaxalign.train", *argv]) == 0
    student = load_file(str(models / "student" / "model.safetensors"))
    dckd = load_file(str(workdir / "stages" / "dckd" / "export" / "model.safetensors"))
    adpa = load_file(str(workdir / "stages" / "adpa" / "export" / "model.safetensors"))
    for before, after in ((student, dckd), (dckd, adpa)):
        for name in before:
            assert (not np.array_equal(before[name], after[name])) == any(f".{t}." in name for t in targets), name
    for stage in ("dckd", "adpa"):
        assert (workdir / "stages" / stage / "export" / "adapter" / "adapter_model.safetensors").is_file()
        assert all(np.isfinite(e["loss"]) for e in read_metrics(workdir / "stages" / stage) if "loss" in e)
