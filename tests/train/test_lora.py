"""LoRA in the trainer: only adapters in the train state, reference = base with adapters off
(step-1 DPO loss ln 2), base weights untouched, resume, and the merged + PEFT export."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxalign.models.lora import LoRAParam
from jaxalign.train.config import ConfigError, validate
from jaxalign.train.loop import train
from jaxalign.train.run import prepare

TARGETS = ("q_proj", "v_proj", "down_proj")


def _lora(make_config, **overrides):
    return make_config(**{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": TARGETS,
                          "optimizer.learning_rate": 1e-2, **overrides})


def test_lora_state_holds_only_adapters_and_their_moments(make_config, tmp_path):
    run = prepare(_lora(make_config), str(tmp_path))
    leaves = nnx.to_flat_state(run.state.params["model"])
    assert leaves and all(isinstance(v, LoRAParam) for _, v in leaves)
    assert {k[-2] for k, _ in leaves} == set(TARGETS) and {k[-1] for k, _ in leaves} == {"lora_a", "lora_b"}
    adapter_size = sum(v[...].size for _, v in leaves)
    moments = sum(x.size for x in jax.tree.leaves(run.state.opt_state) if getattr(x, "ndim", 0) > 0)
    assert moments == 2 * adapter_size  # adamw: mu and nu of the adapters, nothing of the base
    base = nnx.to_flat_state(run.reference_params)
    assert not any(isinstance(v, LoRAParam) for _, v in base)


@pytest.mark.parametrize("mode", ["frozen", "precomputed"])
def test_lora_dpo_starts_at_ln2_and_trains_only_adapters(make_config, tmp_path, metrics_by_step, tiny_model_dir, mode):
    config = _lora(make_config, **{"steps": 3, "reference.mode": mode, "checkpoint.export": True})
    result = train(config, tmp_path / "run")
    metrics = metrics_by_step(tmp_path / "run")
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[3]["loss"] != pytest.approx(math.log(2), abs=1e-4)

    # The merged export: targeted kernels moved, every other tensor is the base's, bit for bit.
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    merged = load_file(os.path.join(result.export_dir, "model.safetensors"))
    assert base.keys() == merged.keys()
    for name in base:
        changed = not np.array_equal(base[name], merged[name])
        assert changed == any(f".{t}." in name for t in TARGETS), name

    adapter = os.path.join(result.export_dir, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and np.abs(b).max() > 0


def test_lora_resume_matches_uninterrupted_run(make_config, tmp_path, metrics_by_step):
    config = _lora(make_config, **{"steps": 4, "checkpoint_every": 2})
    train(config, tmp_path / "full")
    train(config, tmp_path / "part", stop_at_step=2)
    resumed = train(config, tmp_path / "part")
    assert resumed.resumed_from == 2
    a, b = metrics_by_step(tmp_path / "full"), metrics_by_step(tmp_path / "part")
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, abs=1e-6), (step, key)


def test_bad_lora_config_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"'lora.rank' must be >= 0, got -1"):
        validate(make_config(**{"lora.rank": -1}))
    with pytest.raises(ConfigError, match=r"unknown projection 'q_prj' \(did you mean 'q_proj'\?\)"):
        validate(make_config(**{"lora.rank": 8, "lora.targets": ("q_prj",)}))
    with pytest.raises(ConfigError, match="'lora.base_dtype' needs --config.lora.rank > 0"):
        validate(make_config(**{"lora.base_dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match=r"'lora.base_dtype' = 'float16' is not allowed.*allowed: \"\", float32"):
        validate(make_config(**{"lora.rank": 8, "lora.base_dtype": "float16"}))


def test_lora_base_in_bfloat16(make_config, tmp_path, metrics_by_step, tiny_model_dir):
    """``lora.base_dtype = bfloat16``: the frozen base is held in bfloat16, the adapters and their
    moments in float32; the reference is the same bfloat16 base (step-1 loss ln 2); the merged
    export's untargeted tensors are the base's, rounded to bfloat16."""
    import jax.numpy as jnp

    config = _lora(make_config, **{"steps": 3, "lora.base_dtype": "bfloat16", "checkpoint.export": True})
    run = prepare(config, str(tmp_path / "prepared"))
    assert {x.dtype for x in jax.tree.leaves(run.reference_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(run.state.params)} == {jnp.dtype(jnp.float32)}
    result = train(config, tmp_path / "run")
    metrics = metrics_by_step(tmp_path / "run")
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert np.isfinite(metrics[3]["loss"]) and metrics[3]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    merged = load_file(os.path.join(result.export_dir, "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_array_equal(merged[name].astype(np.float32),
                                  base[name].astype(jnp.bfloat16).astype(np.float32))


def test_the_quickstart_learns_with_lora_adapters(tmp_path, capsys):
    """``configs/quickstart.py --config.lora.rank=8``: rank-8 adapters on q/k/v/o learn the
    synthetic preference (held-out accuracy 0 -> 1, loss below ln 2)."""
    from jaxalign.train.cli import main
    from jaxalign.train.metrics import read_metrics

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["jaxalign.train", "--config", os.path.join(root, "configs", "quickstart.py"), "--workdir",
            str(tmp_path / "run"), f"--config.model.path={tmp_path / 'tiny'}", "--config.lora.rank=8",
            "--config.progress_bar=False", "--config.huge_pages=False"]
    assert main(argv) == 0, capsys.readouterr().err
    evals = [e for e in read_metrics(tmp_path / "run") if "eval/rewards/accuracies" in e]
    assert evals[0]["eval/rewards/accuracies"] == 0.0 and evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9 and evals[-1]["eval/loss"] < 0.6
    assert os.path.isfile(tmp_path / "run" / "export" / "adapter" / "adapter_model.safetensors")


def test_a_run_starts_from_a_peft_adapter_and_refuses_a_mismatched_one(make_config, tmp_path):
    """``lora.adapter``: the new run's adapters are the directory's (``A = lora_A.T``,
    ``B = lora_B.T``); another rank or another alpha is a clear error."""
    from jaxalign.train.build import RunError

    first = train(_lora(make_config, **{"steps": 2, "checkpoint.export": True}), tmp_path / "first")
    adapter = os.path.join(first.export_dir, "adapter")
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    run = prepare(_lora(make_config, **{"lora.adapter": adapter}), str(tmp_path / "second"))
    layer = nnx.to_flat_state(run.state.params["model"])
    loaded = {k: np.asarray(jax.device_get(v[...])) for k, v in layer}
    q_a = next(v for k, v in loaded.items() if k[-2] == "q_proj" and k[-1] == "lora_a" and "0" in map(str, k))
    q_b = next(v for k, v in loaded.items() if k[-2] == "q_proj" and k[-1] == "lora_b" and "0" in map(str, k))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(q_a.reshape(-1, 4), weights[f"{name}.lora_A.weight"].T)
    np.testing.assert_array_equal(q_b.reshape(4, -1), weights[f"{name}.lora_B.weight"].T)
    assert np.abs(q_b).max() > 0  # trained, not fresh (B starts at 0)
    with pytest.raises(RunError, match="rank 4, the run's adapters rank 8"):
        prepare(_lora(make_config, **{"lora.adapter": adapter, "lora.rank": 8}), str(tmp_path / "third"))
    with pytest.raises(RunError, match="lora_alpha 8.0, the run's lora.alpha 16.0"):
        prepare(_lora(make_config, **{"lora.adapter": adapter, "lora.alpha": 16.0}), str(tmp_path / "fourth"))
    with pytest.raises(ConfigError, match="'lora.adapter' needs --config.lora.rank > 0"):
        validate(make_config(**{"lora.adapter": adapter}))


def test_lora_on_eight_devices_and_with_accumulation_equals_one_device(make_config, tmp_path, metrics_by_step):
    """LoRA DPO, 3 steps of 8 pairs: one device, a (data=2, fsdp=2, tensor=2) mesh of 8 devices and
    4 micro-batches of 2 give the same losses and adapters (SGD: float noise stays small)."""
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices, this process has {jax.device_count()}")
    sgd = {"steps": 3, "data.batch_size": 8, "optimizer.name": "sgd", "optimizer.learning_rate": 0.5,
           "optimizer.schedule": "constant", "checkpoint.export": True}
    layouts = {"one": {}, "mesh": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
               "accumulation": {"data.micro_batch_size": 2}}
    runs = {name: train(_lora(make_config, **sgd, **extra), tmp_path / name) for name, extra in layouts.items()}
    losses = {name: [metrics_by_step(tmp_path / name)[s]["loss"] for s in (1, 2, 3)] for name in layouts}
    adapters = {name: load_file(os.path.join(r.export_dir, "adapter", "adapter_model.safetensors"))
                for name, r in runs.items()}
    for name in ("mesh", "accumulation"):
        np.testing.assert_allclose(losses[name], losses["one"], rtol=0, atol=1e-5)
        for key, value in adapters["one"].items():
            np.testing.assert_allclose(adapters[name][key], value, rtol=0, atol=1e-5, err_msg=f"{name} {key}")
    assert losses["one"][2] < losses["one"][0]


@pytest.mark.parametrize("loss", ["sft", "bradley_terry", "ipo", "vpo", "dove"])
def test_lora_trains_the_other_objectives(loss, make_config, tmp_path, metrics_by_step, tiny_model_dir):
    """SFT, a reward model (its head trains beside the adapters), IPO, VPO (its calibration
    sampled from the base, adapters off) and DOVE run with LoRA: finite losses that move, the
    base weights untouched outside the merged adapters, an export."""
    reference = "none" if loss in ("sft", "bradley_terry") else "frozen"
    result = train(_lora(make_config, **{"steps": 3, "loss.name": loss, "reference.mode": reference,
                                         "checkpoint.export": True}), tmp_path / "run")
    losses = [metrics_by_step(tmp_path / "run")[s]["loss"] for s in (1, 2, 3)]
    assert all(math.isfinite(v) for v in losses) and losses[2] != losses[0]
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    merged = load_file(os.path.join(result.export_dir, "model.safetensors"))
    untouched = [k for k in base if not any(f".{t}." in k for t in TARGETS) and k in merged]
    assert untouched and all(np.array_equal(base[k], merged[k]) for k in untouched)
    assert os.path.isfile(os.path.join(result.export_dir, "adapter", "adapter_model.safetensors"))
