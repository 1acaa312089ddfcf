"""Optimizers and schedules from the config: values at chosen steps, clipping, decay mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.train.config import base_config
from jaxalign.train.optimizer import make_optimizer, make_schedule


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
