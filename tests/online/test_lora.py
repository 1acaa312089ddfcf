"""LoRA in the online driver: the state holds only adapters, the rounds sample from the base
joined with them, the initial reference is the base (adapters off), and the export carries the
merged model and the PEFT adapter."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

from jaxalign.online import driver

TARGETS = ("q_proj", "v_proj")


def test_online_dpo_with_lora_adapters(make_config, helpers, tmp_path, reference_run, tiny_model_dir):
    config = make_config(**{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": TARGETS,
                            "optimizer.learning_rate": 1e-2, "checkpoint_every": 1})
    result = driver.train(config, tmp_path / "run")
    assert result.status == "finished", result.message
    workdir = result.workdir
    # fresh adapters leave the model as it is: round 1 samples and pairs like the full fine-tuning run,
    # and its KL to the initial reference (the base, adapters off) is 0
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert helpers.read_round(workdir, 1, name) == helpers.read_round(reference_run.workdir, 1, name)
    assert abs(helpers.round_summary(workdir, 1)["online/kl"]) < 1e-4
    # round 2 samples from the trained adapters: away from the base
    assert abs(helpers.round_summary(workdir, 2)["online/kl"]) > 1e-3
    # the checkpoints hold the adapters (and their moments) only
    saved = helpers.checkpoint_arrays(workdir, result.step)
    model = [k for k in saved if "'model'" in k and "opt_state" not in k]
    assert model and all("['lora_a']" in k or "['lora_b']" in k for k in model), model[:4]
    # the export: targeted kernels moved, every other tensor is the base's; the PEFT adapter beside it
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    merged = helpers.export_params(workdir)
    for name in base:
        assert (not np.array_equal(base[name], merged[name])) == any(f".{t}." in name for t in TARGETS), name
    adapter = json.load(open(os.path.join(result.export_dir, "adapter", "adapter_config.json")))
    assert (adapter["r"], sorted(adapter["target_modules"])) == (4, sorted(TARGETS))
