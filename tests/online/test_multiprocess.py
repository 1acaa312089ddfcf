"""Two ``jax.distributed`` processes (4 fake CPU devices each) run the online rounds like one
process with 8 devices: each samples its share of every round's prompts, the samples are
gathered, and both build the same pairs; the round files and the final parameters match."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxalign.online import driver

SGD = {"optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.learning_rate": 0.5,
       "optimizer.schedule": "constant", "data.batch_size": 8, "mesh.data": 4, "mesh.fsdp": 2,
       "online.eval_prompts": 3}  # 3 held-out prompts: a list that does not split evenly over 2 processes
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_run_the_rounds_of_one(make_config, helpers, cli_env, tmp_path):
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices, this process has {jax.device_count()}")
    config = make_config(**SGD)
    recipe = helpers.write_recipe(config, tmp_path / "recipe.py")
    two = tmp_path / "two"
    env = dict(cli_env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxalign.train", "--config", recipe, "--workdir", str(two),
         f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}", "--config.distributed.initialization_timeout=60",
         "--config.distributed.heartbeat_timeout=30"],
        env=env, cwd=helpers.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) for i in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"

    one = driver.train(config, tmp_path / "one")
    assert one.status == "finished", one.message
    for r in (1, 2):
        for name in ("samples.jsonl", "rewards.jsonl", "pairs.jsonl"):
            a, b = helpers.read_round(one.workdir, r, name), helpers.read_round(two, r, name)
            if name == "samples.jsonl":
                assert [x["completion_ids"] for x in a] == [x["completion_ids"] for x in b], f"round {r}"
                np.testing.assert_allclose([x["logps"] for x in a], [x["logps"] for x in b], atol=1e-4)
            else:
                assert a == b, f"round {r} {name}"
        sa, sb = helpers.round_summary(one.workdir, r), helpers.round_summary(two, r)
        assert (sa["step"], sa["online/pairs"], sa["eval/reward_mean"]) == (sb["step"], sb["online/pairs"],
                                                                           sb["eval/reward_mean"])
    pa, pb = helpers.export_params(one.workdir), helpers.export_params(two)
    diff = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    print(f"two processes vs one: max |param diff| {diff:.2e}")
    assert diff <= 1e-5
    assert not os.path.exists(os.path.join(two, "rounds", "0001", "samples.jsonl.tmp-0"))
