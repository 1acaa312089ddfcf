"""Optimizers and schedules from the config: values at chosen steps, clipping, decay mask
(which leaves of a real Llama and GPT-2 parameter tree decay)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.train.config import base_config
from jaxalign.train.optimizer import decay_mask, make_optimizer, make_schedule


def optimizer_config(**changes):
    c = base_config().optimizer
    for key, value in changes.items():
        c[key] = value
    return c


def test_warmup_then_cosine_to_the_end_factor():
    c = optimizer_config(learning_rate=1.0, warmup_steps=10, schedule="cosine", end_factor=0.1)
    lr = make_schedule(c, total_steps=110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert float(lr(110)) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    linear = make_schedule(optimizer_config(learning_rate=2.0, warmup_steps=0, schedule="linear"), 100)
    assert float(linear(0)) == 2.0 and float(linear(50)) == pytest.approx(1.0) and float(linear(100)) == 0.0
    constant = make_schedule(optimizer_config(learning_rate=3.0, warmup_steps=4, schedule="constant"), 100)
    assert float(constant(2)) == pytest.approx(1.5) and float(constant(50)) == 3.0


PARAMS = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones((3,))}


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_each_optimizer_steps_against_the_gradient(name):
    optimizer, _ = make_optimizer(optimizer_config(name=name, learning_rate=0.1, warmup_steps=0), 10)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = optimizer.update(grads, optimizer.init(PARAMS), PARAMS)
    assert all(float(jnp.max(u)) < 0 for u in jax.tree.leaves(updates))


def test_clipping_bounds_the_global_norm():
    c = optimizer_config(name="sgd", learning_rate=1.0, schedule="constant", warmup_steps=0, max_grad_norm=0.5)
    optimizer, _ = make_optimizer(c, 10)
    grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), PARAMS)
    updates, _ = optimizer.update(grads, optimizer.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-5)


def test_weight_decay_skips_vectors():
    c = optimizer_config(name="sgd", learning_rate=1.0, schedule="constant", warmup_steps=0, max_grad_norm=0.0,
                         weight_decay=0.1)
    optimizer, _ = make_optimizer(c, 10)
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = optimizer.update(zero, optimizer.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["kernel"], -0.1 * np.ones((2, 3)))
    np.testing.assert_allclose(updates["scale"], np.zeros(3))


# Every parameter of a one-layer hidden-32 model with all biases, and whether it decays:
# projection kernels, lm_head, embeddings (GPT-2's positions too) and the reward head's kernel
# do; norm scales, LayerNorm biases and every other bias (2-D and 3-D ones included) do not.
DECAYED = {
    "llama": {
        "model/embed_tokens/embedding", "model/lm_head",
        "model/layers/0/self_attn/q_proj/kernel", "model/layers/0/self_attn/k_proj/kernel",
        "model/layers/0/self_attn/v_proj/kernel", "model/layers/0/self_attn/o_proj/kernel",
        "model/layers/0/mlp/gate_proj/kernel", "model/layers/0/mlp/up_proj/kernel",
        "model/layers/0/mlp/down_proj/kernel", "head/kernel",
    },
    "gpt2": {
        "model/wte/embedding", "model/wpe/embedding", "model/lm_head",
        "model/h/0/attn/c_attn/kernel", "model/h/0/attn/c_proj/kernel",
        "model/h/0/mlp/c_fc/kernel", "model/h/0/mlp/c_proj/kernel", "head/kernel",
    },
}
NOT_DECAYED = {
    "llama": {
        "model/layers/0/input_layernorm/scale", "model/layers/0/post_attention_layernorm/scale",
        "model/norm/scale", "model/layers/0/self_attn/q_proj/bias", "model/layers/0/self_attn/k_proj/bias",
        "model/layers/0/self_attn/v_proj/bias", "model/layers/0/self_attn/o_proj/bias",
    },
    "gpt2": {
        "model/h/0/ln_1/scale", "model/h/0/ln_1/bias", "model/h/0/ln_2/scale", "model/h/0/ln_2/bias",
        "model/ln_f/scale", "model/ln_f/bias", "model/h/0/attn/c_attn/bias", "model/h/0/attn/c_proj/bias",
        "model/h/0/mlp/c_fc/bias", "model/h/0/mlp/c_proj/bias",
    },
}


def _name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return "/".join(str(k) for k in keys if k != "value")


def _named_leaves(tree) -> dict:
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _trainer_params(family: str):
    """``{"model": nnx.State, "head": ...}`` as ``build_state`` hands them to the optimizer."""
    extra = {"attention_bias": True} if family == "llama" else {}
    config = tiny_config(family, vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                         intermediate_size=64, **extra)
    _, state = nnx.split(make_model(config), nnx.Param)
    return {"model": state, "head": {"kernel": jnp.full((32,), 0.5)}}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decay_mask_names_exactly_the_weights_of_linear_maps_and_tables(family):
    params = _trainer_params(family)
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flags = _named_leaves(mask)
    assert set(flags) == DECAYED[family] | NOT_DECAYED[family]
    assert {name for name, d in flags.items() if d} == DECAYED[family]
    # The same answer from plain arrays (no nnx.Variable, no logical axes): names alone suffice.
    plain = {"model": nnx.to_pure_dict(params["model"]), "head": params["head"]}
    assert {name for name, d in _named_leaves(decay_mask(plain)).items() if d} == DECAYED[family]


def test_stacked_norm_scales_and_biases_are_not_decayed():
    stacked = {"layers": {
        "input_layernorm": {"scale": jnp.zeros((4, 32))},
        "ln_1": {"bias": jnp.zeros((4, 32)), "scale": jnp.zeros((4, 32))},
        "self_attn": {"q_proj": {"bias": jnp.zeros((4, 4, 8)), "kernel": jnp.zeros((4, 32, 4, 8))}},
        "mlp": {"up_proj": {"bias": jnp.zeros((4, 64)), "kernel": jnp.zeros((4, 32, 64))}},
    }}
    assert _named_leaves(decay_mask(stacked)) == {
        "layers/input_layernorm/scale": False, "layers/ln_1/bias": False, "layers/ln_1/scale": False,
        "layers/self_attn/q_proj/bias": False, "layers/self_attn/q_proj/kernel": True,
        "layers/mlp/up_proj/bias": False, "layers/mlp/up_proj/kernel": True,
    }
    # A parameter whose logical axes say "norm" is not decayed whatever it is called.
    weird = {"block": {"w": nnx.Param(jnp.zeros((4, 32)), out_sharding=("layers", "norm"), eager_sharding=False),
                       "k": nnx.Param(jnp.zeros((4, 32)), out_sharding=("layers", "embed"), eager_sharding=False)}}
    assert _named_leaves(decay_mask(nnx.State(weird))) == {"block/w": False, "block/k": True}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_adamw_step_with_zero_gradients_changes_only_decayed_leaves(family):
    c = optimizer_config(name="adamw", learning_rate=0.1, schedule="constant", warmup_steps=0, max_grad_norm=1.0,
                         weight_decay=0.5)
    optimizer, _ = make_optimizer(c, 10)
    # Non-zero everywhere (biases start at 0, where decay would change nothing).
    params = jax.tree.map(lambda x: x + 1.0, _trainer_params(family))
    zero = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def step(params, grads):
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    before, after = _named_leaves(params), _named_leaves(step(params, zero))
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == DECAYED[family]
    for name in changed:  # decoupled decay: p <- p - lr * wd * p
        np.testing.assert_allclose(after[name], before[name] * (1 - 0.1 * 0.5), rtol=1e-6)
