"""One device equals eight: a 2-round run on a (data=4, fsdp=2) mesh of the tests' 8 CPU
devices samples the same completions, scores and pairs them the same, and ends with the
parameters of the run on one device within float tolerance. SGD with momentum, so that the
parameters differ by at most the learning rate times the gradients' reduction-order noise
(Adam would turn near-zero gradient noise into whole learning-rate steps)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.online import driver

SGD = {"optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.learning_rate": 0.5,
       "optimizer.schedule": "constant", "data.batch_size": 8}


def test_one_device_and_eight_devices_run_the_same_rounds(make_config, helpers, tmp_path, tiny_model_dir):
    if jax.device_count() < 8:  # tests/conftest.py asks for 8 fake CPU devices unless XLA_FLAGS sets a count
        pytest.skip(f"needs 8 devices, this process has {jax.device_count()}")
    runs = {}
    for name, mesh in (("one", (1, 1)), ("eight", (4, 2))):
        config = make_config(**SGD, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1]})
        result = driver.train(config, tmp_path / name)
        assert result.status == "finished", result.message
        runs[name] = result.workdir
    one, eight = runs["one"], runs["eight"]
    for r in (1, 2):
        a, b = (helpers.read_round(w, r, "samples.jsonl") for w in (one, eight))
        assert [line["completion_ids"] for line in a] == [line["completion_ids"] for line in b], f"round {r}"
        assert [line["prompt_index"] for line in a] == [line["prompt_index"] for line in b]
        np.testing.assert_allclose([line["logps"] for line in a], [line["logps"] for line in b], rtol=0, atol=1e-4)
        for name in ("rewards.jsonl", "pairs.jsonl"):
            assert helpers.read_round(one, r, name) == helpers.read_round(eight, r, name), f"round {r} {name}"
        sa, sb = helpers.round_summary(one, r), helpers.round_summary(eight, r)
        assert sa["step"] == sb["step"] and sa["online/pairs"] == sb["online/pairs"]
        assert sb["online/kl"] == pytest.approx(sa["online/kl"], abs=1e-4)
        assert sb["eval/reward_mean"] == sa["eval/reward_mean"]
    pa, pb = helpers.export_params(one), helpers.export_params(eight)
    assert pa.keys() == pb.keys()
    diff = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    moved = max(float(np.max(np.abs(pa[k] - p))) for k, p in load_file(f"{tiny_model_dir}/model.safetensors").items())
    print(f"1 vs 8 devices: max |param diff| {diff:.2e} (the training moved them by up to {moved:.2e})")
    assert diff <= 1e-5 and moved > 1e-3
