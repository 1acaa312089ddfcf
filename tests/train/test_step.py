"""The jitted train step: gradient accumulation, filler pairs, packing, invariants, precision."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.data.pipeline import build_loader
from jaxalign.models import from_pretrained
from jaxalign.tokenizers import load_tokenizer
from jaxalign.train.config import base_config
from jaxalign.data.batching import stack_micro_batches
from jaxalign.objectives import STEP_KEYS, from_config
from jaxalign.scoring.forward import Forward
from jaxalign.train.optimizer import make_optimizer
from jaxalign.train.state import init_state
from jaxalign.train.step import make_eval_step, make_train_step


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model_parts(tiny_model_dir):
    model = from_pretrained(tiny_model_dir)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, model.config


def batches(rows, tokenizer, tmp_path, *, batch_size: int, packing=False):
    """``rows`` (JSON records) as consecutive batches of ``batch_size`` slots, in order."""
    path = tmp_path / f"rows-{len(rows)}-{batch_size}-{packing}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    family = "sft" if "completion" in rows[0] else "preference"
    loader = build_loader(
        str(path), tokenizer, batch_size=batch_size, max_length=64, max_prompt_length=32, family=family,
        buckets=(64,), packing=packing, shuffle=False, pack_rows=2 * batch_size if packing else None,
    )
    return [{k: v for k, v in next(loader).items() if k in STEP_KEYS} for _ in range(-(-len(rows) // batch_size))]


def sgd_step(model_parts, loss_name: str, micro_batches, *, reference_mode="frozen", ref_params=None, head=False):
    """One SGD(lr=1, no clipping) step; returns (metrics, grads) with grads = params - new params."""
    graphdef, params, model_config = model_parts
    c = base_config()
    c.loss.name = loss_name
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 1.0
    c.optimizer.schedule = "constant"
    c.optimizer.max_grad_norm = 0.0
    optimizer, schedule = make_optimizer(c.optimizer, 10)
    objective = from_config(c.loss, reference_mode)
    step = make_train_step(
        forward=Forward(graphdef), objective=objective, optimizer=optimizer, schedule=schedule,
        reference_mode=reference_mode, donate=False,
    )
    train_params = {"model": params}
    if head:
        train_params.update(objective.init_extra(model_config, 1))
    state = init_state(train_params, optimizer, seed=0)
    reference = params if ref_params is None else ref_params
    new, metrics = step(state, stack_micro_batches(micro_batches), reference if reference_mode == "frozen" else None)
    grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), state.params, new.params)
    return jax.device_get(metrics), grads


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def other_reference(tiny_model_dir, model_parts):
    """A reference that differs from the policy (so rewards and margins are non-zero)."""
    params = model_parts[1]
    key = jax.random.PRNGKey(42)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.mark.parametrize("loss_name", ["dpo", "bradley_terry"])
def test_accumulation_1x8_equals_4x2(loss_name, records, tokenizer, tmp_path, model_parts, other_reference):
    # 7 real pairs: the full batch has one filler pair, the last micro-batch one real and one filler.
    full = batches(records[:7], tokenizer, tmp_path, batch_size=8)
    micro = batches(records[:7], tokenizer, tmp_path, batch_size=2)
    assert full[0]["pair_mask"].sum() == 7 and micro[-1]["pair_mask"].tolist() == [1.0, 0.0]
    head = loss_name == "bradley_terry"
    m1, g1 = sgd_step(model_parts, loss_name, full, ref_params=other_reference, head=head)
    m4, g4 = sgd_step(model_parts, loss_name, micro, ref_params=other_reference, head=head)
    assert abs(m1["loss"] - m4["loss"]) <= 1e-5
    assert max_abs_diff(g1, g4) <= 1e-5
    assert max(abs(float(np.max(np.abs(g)))) for g in jax.tree.leaves(g1)) > 1e-4  # gradients are not trivially 0
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen"):
        assert abs(m1[key] - m4[key]) <= 1e-5, key
    assert m1["num_pairs"] == m4["num_pairs"] == 7


def test_packed_accumulation_pads_micro_batches_to_common_rows(records, tokenizer, tmp_path, model_parts,
                                                               other_reference):
    full = batches(records[:8], tokenizer, tmp_path, batch_size=8, packing=True)
    micro = batches(records[:8], tokenizer, tmp_path, batch_size=3, packing=True)  # 3 + 3 + 2 pairs, 1 filler
    assert [b["input_ids"].shape[0] for b in micro] == [3, 3, 2]  # one row per pair here: rows differ
    m1, g1 = sgd_step(model_parts, "dpo", full, ref_params=other_reference)
    m4, g4 = sgd_step(model_parts, "dpo", micro, ref_params=other_reference)  # stacked: padded to common rows
    assert abs(m1["loss"] - m4["loss"]) <= 1e-5 and m1["num_pairs"] == m4["num_pairs"] == 8
    assert max_abs_diff(g1, g4) <= 1e-5


def test_sft_accumulation_normalises_by_global_tokens(records, tokenizer, tmp_path, model_parts):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records[:8]]
    full = batches(rows, tokenizer, tmp_path, batch_size=8)
    micro = batches(rows, tokenizer, tmp_path, batch_size=2)
    counts = [float(b["loss_mask"].sum()) for b in micro]
    assert len(set(counts)) > 1  # unequal token counts: a per-micro-batch mean would differ
    m1, g1 = sgd_step(model_parts, "sft", full, reference_mode="none")
    m4, g4 = sgd_step(model_parts, "sft", micro, reference_mode="none")
    assert abs(m1["loss"] - m4["loss"]) <= 1e-5
    assert max_abs_diff(g1, g4) <= 1e-5
    assert m1["num_tokens"] == m4["num_tokens"] == sum(counts)


def test_first_dpo_step_is_ln2_with_zero_rewards(records, tokenizer, tmp_path, model_parts):
    full = batches(records[:8], tokenizer, tmp_path, batch_size=8)
    metrics, _ = sgd_step(model_parts, "dpo", full)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(metrics[key]) <= 1e-6, (key, metrics[key])
    assert metrics["finite"] == 1.0 and metrics["grad_norm"] > 0


def test_packed_batches_give_the_padded_loss(records, tokenizer, tmp_path, model_parts, other_reference):
    padded = batches(records[:4], tokenizer, tmp_path, batch_size=4)
    packed = batches(records[:4], tokenizer, tmp_path, batch_size=4, packing=True)
    assert packed[0]["segment_ids"].max() > 1  # several sequences share a row
    m_pad, g_pad = sgd_step(model_parts, "dpo", padded, ref_params=other_reference)
    m_pack, g_pack = sgd_step(model_parts, "dpo", packed, ref_params=other_reference)
    assert abs(m_pad["loss"] - m_pack["loss"]) <= 1e-5
    assert abs(m_pad["logps/chosen"] - m_pack["logps/chosen"]) <= 1e-4
    assert max_abs_diff(g_pad, g_pack) <= 1e-5


def test_eval_step_matches_train_metrics(records, tokenizer, tmp_path, model_parts, other_reference):
    graphdef, params, _ = model_parts
    full = batches(records[:8], tokenizer, tmp_path, batch_size=8)
    metrics, _ = sgd_step(model_parts, "dpo", full, ref_params=other_reference)
    c = base_config()
    evaluate = make_eval_step(forward=Forward(graphdef), objective=from_config(c.loss, "frozen"))
    out = jax.device_get(evaluate({"model": params}, full[0], other_reference))
    assert out["weight"] == 8
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        assert out[key] == pytest.approx(metrics[key], abs=1e-6)


def test_bf16_compute_keeps_float32_master_params(tiny_model_dir, records, tokenizer, tmp_path, model_parts):
    graphdef16, params16 = nnx.split(from_pretrained(tiny_model_dir, dtype=jnp.bfloat16), nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
    full = batches(records[:8], tokenizer, tmp_path, batch_size=8)
    c = base_config()
    c.optimizer.learning_rate = 1e-2
    optimizer, schedule = make_optimizer(c.optimizer, 10)
    step = make_train_step(
        forward=Forward(graphdef16), objective=from_config(c.loss, "none"), optimizer=optimizer, schedule=schedule,
        reference_mode="none", donate=False,
    )
    state = init_state({"model": params16}, optimizer, seed=0)
    new, m16 = step(state, stack_micro_batches(full))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert float(m16["finite"]) == 1.0
    # the float32 model's log-probs on the same batch (metrics are computed before the update)
    graphdef32, params32, _ = model_parts
    evaluate = make_eval_step(forward=Forward(graphdef32), objective=from_config(c.loss, "none"), reference_mode="none")
    m32 = jax.device_get(evaluate({"model": params32}, full[0]))
    assert float(m16["logps/chosen"]) == pytest.approx(float(m32["logps/chosen"]), rel=2e-2)
    assert float(m16["logps/chosen"]) != float(m32["logps/chosen"])  # the bf16 path really ran in bf16
