"""Public names, the registry, and jit + grad on every registered loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

ISSUE_NAMES = ["dpo", "ipo", "hinge", "rdpo", "vpo", "dove", "topk_kl", "dckd", "adpa", "sft", "bradley_terry", "get"]


def test_public_names_of_the_issue_are_exported():
    for name in ISSUE_NAMES:
        assert callable(getattr(losses, name)), name
        assert name in losses.__all__, name
    for name in ("token_logps", "sequence_logps", "segment_logps", "token_logps_from_hidden"):
        assert name in losses.__all__, name


def test_registry_lookup_and_error():
    assert losses.get("rdpo") is losses.rdpo
    args = tuple(jnp.array([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    assert float(losses.get("cdpo")(*args)[0]) == pytest.approx(float(losses.dpo(*args, label_smoothing=0.1)[0]))
    assert losses.get("dove") is losses.dove
    assert set(ISSUE_NAMES) - {"get"} <= set(losses.names())
    for name in losses.names():
        assert losses.get(name) is getattr(losses, name)
    with pytest.raises(ValueError, match=r"unknown loss 'sigmoid'; known losses: adpa, bradley_terry, cdpo, dckd, dove, dpo"):
        losses.get("sigmoid")


def _inputs(name):
    """(positional args, keyword args) for each registered loss; arg 0 is differentiated."""
    rng = np.random.default_rng(0)
    pairs = tuple(jnp.asarray(rng.uniform(-30, -5, 4), jnp.float32) for _ in range(4))
    logits = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 6, size=(2, 3, 2)), jnp.int32)
    probs = jnp.full((2, 3, 2), 0.3)
    mask = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    labels = jnp.asarray(rng.integers(0, 6, size=(2, 3)), jnp.int32)
    advantages = jnp.asarray(rng.normal(size=(2, 3, 2)), jnp.float32)
    table = {
        "dpo": (pairs, {"label_smoothing": 0.1}),
        "cdpo": (pairs, {}),
        "ipo": (pairs, {"chosen_lengths": jnp.array([3, 4, 5, 6]), "rejected_lengths": jnp.array([2, 2, 9, 1])}),
        "hinge": (pairs, {"beta": 0.5}),
        "rdpo": (pairs, {"epsilon": 0.2}),
        "vpo": (pairs, {"policy_calibration_logps": pairs[0] - 2, "reference_calibration_logps": pairs[2], "mode": "online"}),
        "dove": (pairs, {"weights": jnp.array([1.0, 1.0, 0.0, 1.0])}),
        "topk_kl": ((logits, ids, probs, mask), {}),
        "dckd": ((logits, labels, ids, probs, mask, logits * 0.5, ids, probs, mask), {}),
        "adpa": ((logits, ids, advantages, mask), {"clip_advantages": True}),
        "sft_adpa": ((logits, labels, mask, logits * 2, ids, advantages, mask), {}),
        "sft": ((jnp.asarray(rng.uniform(-5, 0, size=(2, 3)), jnp.float32), mask), {}),
        "bradley_terry": (pairs[:2], {"margin": 0.5}),
    }
    return table[name]


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_jits_and_differentiates(name):
    fn = losses.get(name)
    args, kwargs = _inputs(name)
    eager_loss, eager_metrics = fn(*args, **kwargs)
    jitted_loss, jitted_metrics = jax.jit(lambda *a: fn(*a, **kwargs))(*args)
    assert jitted_loss.shape == () and jitted_loss.dtype == jnp.float32
    np.testing.assert_allclose(float(jitted_loss), float(eager_loss), rtol=1e-6)
    assert jitted_metrics.keys() == eager_metrics.keys() and jitted_metrics
    for key, value in jitted_metrics.items():
        assert value.shape == (), key
        np.testing.assert_allclose(float(value), float(eager_metrics[key]), rtol=1e-6, atol=1e-7, err_msg=key)
    grad = jax.jit(jax.grad(lambda first: fn(first, *args[1:], **kwargs)[0]))(args[0])
    assert grad.shape == args[0].shape
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)
