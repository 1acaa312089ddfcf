"""Runs that survive being killed, through ``python -m jaxalign.train`` in subprocesses:
SIGTERM (then a second signal while it saves) leaves a checkpoint at the current step and
exit code 75; kill -9 at random steps, resumed each time, ends with the parameters of an
uninterrupted run, bit for bit; two ``jax.distributed`` processes (4 fake devices each) train
like one process with 8 devices, and a SIGTERM to one of them stops both after the same step."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from jaxalign.train.cli import EXIT_INTERRUPTED
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics

TIMEOUT = 120  # seconds for one subprocess to reach a step or to exit


def launch(recipe: str, workdir, env: dict, log_dir) -> subprocess.Popen:
    """``python -m jaxalign.train`` on ``recipe``; stdout/stderr go to files in ``log_dir``."""
    n = len([f for f in os.listdir(log_dir) if f.endswith(".err")])
    out = open(os.path.join(log_dir, f"{n}.out"), "w")
    err = open(os.path.join(log_dir, f"{n}.err"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxalign.train", "--config", recipe, "--workdir", str(workdir)],
        env=env, stdout=out, stderr=err,
    )
    proc.err_path = err.name
    out.close()
    err.close()
    return proc


def stderr_of(proc) -> str:
    with open(proc.err_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def last_logged_step(workdir) -> int:
    entries = read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
    return max((e["step"] for e in entries if "loss" in e), default=0)


def wait_until(condition, proc, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{stderr_of(proc)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{stderr_of(proc)[-3000:]}")
        time.sleep(0.01)


def wait_for_step(workdir, step: int, proc) -> None:
    try:
        wait_until(lambda: last_logged_step(workdir) >= step, proc, f"step {step}")
    except ValueError:  # a line being written: read again
        wait_for_step(workdir, step, proc)


def committed_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(directory) else []


def test_sigterm_saves_the_current_step_and_a_second_signal_changes_nothing(
    make_config, tmp_path, recipe_file, cli_env, checkpoint_arrays
):
    config = make_config(**{
        "steps": 100_000, "checkpoint_every": 0, "checkpoint.async_save": True, "data.eval_pairs": 0,
        "optimizer.schedule": "constant",
    })
    recipe = recipe_file(config, tmp_path / "recipe.py")
    workdir = tmp_path / "run"
    proc = launch(recipe, workdir, cli_env, tmp_path)
    try:
        wait_for_step(workdir, 3, proc)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM; finishing the current step" in stderr_of(proc), proc, "the SIGTERM message")
        proc.send_signal(signal.SIGINT)  # while it finishes the step and writes the checkpoint
        assert proc.wait(timeout=TIMEOUT) == EXIT_INTERRUPTED, stderr_of(proc)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr_of(proc)
    step = last_logged_step(workdir)
    assert step >= 3
    assert "received SIGINT again; ignored while the run stops" in err
    assert f"interrupted by SIGTERM after step {step}: checkpoint saved at {workdir}/checkpoints/{step}" in err
    assert committed_steps(workdir) == [step]  # the only checkpoint: the one written on the signal
    assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]
    arrays = checkpoint_arrays(workdir / "checkpoints", step)
    assert arrays["['step']"] == step
    meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    # the loader position saved with it is the next batch: 48 pairs in batches of 4 are 12 batches per epoch
    assert meta["step"] == step and meta["loader"]["epoch"] * 12 + meta["loader"]["batch"] == step
    # the checkpoint resumes (in this process, two more steps)
    config.steps = step + 2
    resumed = train(config, workdir)
    assert (resumed.resumed_from, resumed.step, resumed.status) == (step, step + 2, "finished")


def test_kill_9_at_random_steps_then_resume_matches_an_uninterrupted_run(
    make_config, tmp_path, recipe_file, cli_env, metrics_by_step
):
    config = make_config(**{
        "steps": 24, "checkpoint_every": 1, "checkpoint.keep": 2, "checkpoint.async_save": True,
        "checkpoint.export": True, "data.eval_pairs": 0,
    })
    reference = train(config, tmp_path / "reference")
    recipe = recipe_file(config, tmp_path / "recipe.py")
    workdir = tmp_path / "killed"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills = []
    for _ in range(3):
        # a step only the new process can log (the killed one may have logged past its last checkpoint)
        target = max([last_logged_step(workdir), *committed_steps(workdir)]) + rng.randint(1, 3)
        proc = launch(recipe, workdir, cli_env, tmp_path)
        try:
            wait_for_step(workdir, target, proc)
            time.sleep(rng.uniform(0.0, 0.05))  # land anywhere in the step or its checkpoint write
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
        finally:
            if proc.poll() is None:
                proc.kill()
        unfinished = [p for p in os.listdir(workdir / "checkpoints") if "orbax-checkpoint-tmp" in p]
        kills.append((last_logged_step(workdir), committed_steps(workdir), unfinished))
    print(f"kill -9 seed {seed}; (last logged step, committed checkpoints, unfinished saves) at each kill: {kills}")
    proc = launch(recipe, workdir, cli_env, tmp_path)
    assert proc.wait(timeout=TIMEOUT) == 0, f"seed {seed}, kills {kills}:\n{stderr_of(proc)[-3000:]}"
    assert "resumed from step" in open(proc.err_path.replace(".err", ".out")).read()

    expected = load_file(os.path.join(reference.export_dir, "model.safetensors"))
    got = load_file(os.path.join(workdir, "export", "model.safetensors"))
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not np.array_equal(expected[k], got[k])]
    assert not differing, f"seed {seed}, kills (last logged step, committed, unfinished saves) {kills}: {differing}"
    # the metrics read like one uninterrupted run: every step once, the same values
    a, b = metrics_by_step(reference.workdir), metrics_by_step(workdir)
    assert [e["step"] for e in read_metrics(workdir)] == list(range(1, 25)), f"seed {seed}, kills {kills}"
    assert a == b, f"seed {seed}, kills {kills}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One optimizer step = 8 pairs over a (data=2, fsdp=2, tensor=2) mesh; SGD (see test_scale.py for why).
MULTIPROCESS = {
    "data.batch_size": 8, "data.eval_pairs": 0, "checkpoint_every": 0, "checkpoint.async_save": True,
    "checkpoint.export": True, "optimizer.name": "sgd", "optimizer.momentum": 0.9,
    "optimizer.learning_rate": 0.5, "optimizer.schedule": "constant", "mesh.data": 2, "mesh.fsdp": 2,
    "mesh.tensor": 2,
}


def launch_two(recipe: str, workdir, env: dict, log_dir, *extra: str) -> list[subprocess.Popen]:
    """Two ``jax.distributed`` processes on 127.0.0.1, 4 fake CPU devices each."""
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = free_port()
    procs = []
    for i in range(2):
        err = open(os.path.join(log_dir, f"process{i}-{port}.err"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxalign.train", "--config", recipe, "--workdir", str(workdir),
             f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
             f"--config.distributed.process_id={i}", "--config.distributed.initialization_timeout=60",
             "--config.distributed.heartbeat_timeout=30", *extra],
            env=env, stdout=err, stderr=subprocess.STDOUT,
        ))
        procs[-1].err_path = err.name
        err.close()
    return procs


def wait_all(procs, expected: int) -> None:
    try:
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=TIMEOUT)
            assert code == expected, f"process {i} exited with {code}:\n{stderr_of(proc)[-4000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_two_processes_train_like_one_and_stop_together_on_sigterm_to_one(
    make_config, tmp_path, recipe_file, cli_env, checkpoint_arrays
):
    recipe = recipe_file(make_config(**MULTIPROCESS, steps=100_000), tmp_path / "recipe.py")
    workdir = tmp_path / "two"
    procs = launch_two(recipe, workdir, cli_env, tmp_path)
    try:
        wait_for_step(workdir, 2, procs[0])
        procs[1].send_signal(signal.SIGTERM)  # only process 1 is told: both must stop after the same step
    except BaseException:
        wait_all(procs, EXIT_INTERRUPTED)
        raise
    wait_all(procs, EXIT_INTERRUPTED)
    step = last_logged_step(workdir)
    assert "received SIGTERM" in stderr_of(procs[1])
    assert f"interrupted by a signal to another process after step {step}" in stderr_of(procs[0])
    assert committed_steps(workdir) == [step]
    state_dir = workdir / "checkpoints" / str(step) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))  # each process wrote its shards
    # resume on two processes and finish two steps later (process 0 alone writes metrics and the export)
    procs = launch_two(recipe, workdir, cli_env, tmp_path, f"--config.steps={step + 2}")
    wait_all(procs, 0)
    assert [e["step"] for e in read_metrics(workdir)] == list(range(1, step + 3))

    # one process with 8 devices: stopped at the same step, then resumed to the same end
    config = make_config(**MULTIPROCESS, steps=step + 2)
    train(config, tmp_path / "one", stop_at_step=step)
    one = train(config, tmp_path / "one")
    a, b = checkpoint_arrays(tmp_path / "one" / "checkpoints", step), checkpoint_arrays(workdir / "checkpoints", step)
    assert a.keys() == b.keys()
    state_diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert state_diff <= 1e-5
    assert (b["['step']"], b["['nonfinite_steps']"]) == (step, 0)
    pa = load_file(os.path.join(one.export_dir, "model.safetensors"))
    pb = load_file(os.path.join(workdir, "export", "model.safetensors"))
    param_diff = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    print(f"two processes vs one: stopped after step {step}; max |state diff| there {state_diff:.2e}, "
          f"max |param diff| after step {step + 2} {param_diff:.2e}")
    assert param_diff <= 1e-5
    losses = [{e["step"]: e["loss"] for e in read_metrics(d) if "loss" in e} for d in (tmp_path / "one", workdir)]
    assert losses[0].keys() == losses[1].keys()
    np.testing.assert_allclose([losses[1][s] for s in losses[0]], list(losses[0].values()), rtol=0, atol=1e-5)
