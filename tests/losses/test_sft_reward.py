"""SFT token-mean NLL and the Bradley-Terry reward-model loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses


def test_sft_is_a_token_mean_over_the_whole_batch():
    token_logps = jnp.array([[0.0, -1.0, -2.0, -9.0], [0.0, -4.0, -7.0, -7.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    loss, metrics = losses.sft(token_logps, mask)
    np.testing.assert_allclose(float(loss), (1 + 2 + 4) / 3, rtol=1e-6)  # not the mean of row means
    assert float(metrics["sft/tokens"]) == 3.0
    grad = jax.grad(lambda t: losses.sft(t, mask)[0])(token_logps)
    np.testing.assert_allclose(np.asarray(grad), -np.asarray(mask) / 3, rtol=1e-6)


def test_sft_empty_mask_is_zero_without_nan_gradient():
    token_logps = jnp.array([[0.0, -1.0]])
    loss, _ = losses.sft(token_logps, jnp.zeros((1, 2)))
    assert float(loss) == 0.0
    grad = jax.grad(lambda t: losses.sft(t, jnp.zeros((1, 2)))[0])(token_logps)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bradley_terry_golden_values_metrics_and_gradient():
    chosen, rejected = jnp.array([1.0, 0.2]), jnp.array([0.5, 0.2])
    loss, metrics = losses.bradley_terry(chosen, rejected)
    # -log sigma(0.5) = 0.474077, -log sigma(0) = ln 2.
    np.testing.assert_allclose(float(loss), (0.474077 + 0.693147) / 2, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), 0.25, atol=1e-7)
    assert float(metrics["rewards/accuracies"]) == 0.5  # the tie counts 0
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), 0.6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), 0.35, atol=1e-7)
    # d/d r_w of -log sigma(d) / 2 = -sigma(-d) / 2.
    grad = jax.grad(lambda c: losses.bradley_terry(c, rejected)[0])(chosen)
    np.testing.assert_allclose(np.asarray(grad), [-0.5 / (1 + np.exp(0.5)), -0.25], atol=1e-7)
    # Identical rewards: zero gradient wrt the shared reward.
    shared = jax.grad(lambda r: losses.bradley_terry(r, r)[0])(chosen)
    np.testing.assert_array_equal(np.asarray(shared), 0.0)


def test_bradley_terry_margin_and_weights():
    chosen, rejected = jnp.array([1.0, 3.0]), jnp.array([0.5, 0.0])
    loss, _ = losses.bradley_terry(chosen[:1], rejected[:1], margin=0.2)
    np.testing.assert_allclose(float(loss), 0.554355, atol=1e-6)  # -log sigma(0.3)
    per_pair_margin, _ = losses.bradley_terry(chosen, rejected, margin=jnp.array([0.2, 1.0]))
    np.testing.assert_allclose(float(per_pair_margin), (0.554355 + np.log1p(np.exp(-2.0))) / 2, atol=1e-6)
    weighted, metrics = losses.bradley_terry(chosen, rejected, margin=0.2, weights=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(float(weighted), 0.554355, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), 1.0, atol=1e-7)
    with pytest.raises(ValueError, match=r"bradley_terry: margin must be a scalar or have the pairs' shape \[2\]"):
        losses.bradley_terry(chosen, rejected, margin=jnp.ones(3))
    with pytest.raises(ValueError, match=r"bradley_terry: weights must have the per-pair shape"):
        losses.bradley_terry(chosen, rejected, weights=jnp.ones(3))
