"""Golden values, gradients, invariants, weights and input checks of the pairwise losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

# Running example of docs/losses.md: c = 1.0, r = -0.5, h = 1.5, beta = 0.1.
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5


def example(**overrides):
    values = {"pc": PC, "pr": PR, "rc": RC, "rr": RR, **overrides}
    return tuple(jnp.array([values[k]], jnp.float32) for k in ("pc", "pr", "rc", "rr"))


def grad_wrt_policy(fn, args, **kwargs):
    """d loss / d (policy_chosen_logps, policy_rejected_logps) as floats."""
    g = jax.grad(lambda pc, pr: fn(pc, pr, *args[2:], **kwargs)[0], argnums=(0, 1))(*args[:2])
    return float(g[0][0]), float(g[1][0])


@pytest.mark.parametrize(
    "fn, kwargs, expected",
    [
        (losses.dpo, {}, 0.620957),
        (losses.dpo, {"label_smoothing": 0.1}, 0.635957),
        (losses.rdpo, {"epsilon": 0.1}, 0.602207),
        (losses.hinge, {}, 0.85),
        (losses.ipo, {}, 12.25),
        (losses.ipo, {"chosen_lengths": jnp.array([5]), "rejected_lengths": jnp.array([10])}, 22.5625),
        (losses.dove, {}, 0.620957),
    ],
    ids=["dpo", "cdpo", "rdpo", "hinge", "ipo-sums", "ipo-length-normalised", "dove-as-dpo"],
)
def test_golden_values_on_running_example(fn, kwargs, expected):
    loss, metrics = fn(*example(), beta=0.1, **kwargs)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)
    expected_metrics = {
        "rewards/chosen": 0.1,
        "rewards/rejected": -0.05,
        "rewards/margins": 0.15,
        "rewards/accuracies": 1.0,
        "logps/chosen": PC,
        "logps/rejected": PR,
    }
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "fn, kwargs, dloss_dh",
    [
        (losses.dpo, {}, -0.046257),
        (losses.dpo, {"label_smoothing": 0.1}, -0.036257),
        (losses.rdpo, {"epsilon": 0.1}, -0.058757),
        (losses.hinge, {}, -0.1),
        (losses.ipo, {}, 2 * (1.5 - 5.0)),
    ],
    ids=["dpo", "cdpo", "rdpo", "hinge", "ipo"],
)
def test_golden_gradients(fn, kwargs, dloss_dh):
    # h = (pc - rc) - (pr - rr): dL/dpc = dL/dh and dL/dpr = -dL/dh.
    g_chosen, g_rejected = grad_wrt_policy(fn, example(), beta=0.1, **kwargs)
    np.testing.assert_allclose(g_chosen, dloss_dh, atol=1e-6)
    np.testing.assert_allclose(g_rejected, -dloss_dh, atol=1e-6)


def test_cdpo_stationary_margin():
    # cDPO's gradient vanishes at beta*h = log((1-eps)/eps) (2.1972 for eps = 0.1).
    h = math.log(0.9 / 0.1) / 0.1
    args = example(pc=-10.0 + h, pr=-10.0, rc=-10.0, rr=-10.0)
    g_chosen, _ = grad_wrt_policy(losses.dpo, args, beta=0.1, label_smoothing=0.1)
    assert abs(g_chosen) < 1e-6


def test_ipo_lengths_are_clamped_to_one():
    # Zero completion tokens count as one (no division by zero, as TRL).
    loss, _ = losses.ipo(*example(), chosen_lengths=jnp.array([0]), rejected_lengths=jnp.array([0]))
    np.testing.assert_allclose(float(loss), 12.25, atol=1e-6)


def test_rdpo_is_unbounded_below():
    # docs/losses.md 2.3: eps = 0.1 at h = 10 / 50 / 100.
    for h, expected in [(10.0, 0.188262), (50.0, -0.618285), (100.0, -1.249955)]:
        loss, _ = losses.rdpo(*example(pc=-10.0 + h, pr=-10.0, rc=-10.0, rr=-10.0), epsilon=0.1)
        np.testing.assert_allclose(float(loss), expected, atol=1e-5)


def test_rdpo_is_unbiased_under_label_flips():
    # Flip each label with probability eps: the expected rDPO loss is the clean DPO loss.
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.uniform(-40, -5, 32), jnp.float32) for _ in range(4))
    eps = 0.2
    kept, _ = losses.rdpo(pc, pr, rc, rr, epsilon=eps)
    flipped, _ = losses.rdpo(pr, pc, rr, rc, epsilon=eps)
    clean, _ = losses.dpo(pc, pr, rc, rr)
    np.testing.assert_allclose(float((1 - eps) * kept + eps * flipped), float(clean), rtol=1e-5)
    # On the running example the expectation is exactly 0.620957 (docs/losses.md 2.1).
    kept, _ = losses.rdpo(*example(), epsilon=eps)
    flipped, _ = losses.rdpo(*example(pc=PR, pr=PC, rc=RR, rr=RC), epsilon=eps)
    np.testing.assert_allclose(float((1 - eps) * kept + eps * flipped), 0.620957, atol=1e-6)


def test_cdpo_matches_its_formula_on_random_inputs():
    # TRL >= 0.29 dropped label smoothing from its sigmoid loss, so cDPO is checked against the
    # formula (1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h), computed in numpy.
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.uniform(-60, -5, 64) for _ in range(4))
    beta, eps = 0.3, 0.15
    z = beta * ((pc - rc) - (pr - rr))
    expected = np.mean((1 - eps) * np.logaddexp(0, -z) + eps * np.logaddexp(0, z))
    with jax.enable_x64(True):
        loss, _ = losses.dpo(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


PAIRWISE = {
    "dpo": (losses.dpo, {}),
    "cdpo": (losses.dpo, {"label_smoothing": 0.1}),
    "rdpo": (losses.rdpo, {"epsilon": 0.1}),
    "hinge": (losses.hinge, {}),
    "ipo": (losses.ipo, {}),
    "dove": (losses.dove, {}),
}


@pytest.mark.parametrize("name", sorted(PAIRWISE))
def test_policy_equal_to_reference(name):
    fn, kwargs = PAIRWISE[name]
    logps = jnp.array([-12.0, -30.0, -7.5])
    other = jnp.array([-20.0, -9.0, -7.5])
    loss, metrics = fn(logps, other, logps, other, beta=0.1, **kwargs)
    expected = {"hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2}.get(name, math.log(2))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[key]) == 0.0, key


def test_epsilon_zero_and_alpha_zero_reduce_to_dpo():
    rng = np.random.default_rng(2)
    args = tuple(jnp.asarray(rng.uniform(-40, -5, 8), jnp.float32) for _ in range(4))
    dpo_loss, dpo_metrics = losses.dpo(*args)
    dpo_grad = jax.grad(lambda a: losses.dpo(a, *args[1:])[0])(args[0])
    variants = {
        "cdpo": lambda a: losses.dpo(a, *args[1:], label_smoothing=0.0),
        "rdpo": lambda a: losses.rdpo(a, *args[1:], epsilon=0.0),
        "vpo": lambda a: losses.vpo(
            a, *args[1:], policy_calibration_logps=args[0] * 2, reference_calibration_logps=args[2], alpha=0.0
        ),
    }
    for name, fn in variants.items():
        loss, metrics = fn(args[0])
        np.testing.assert_allclose(float(loss), float(dpo_loss), rtol=1e-7, err_msg=name)
        for key, value in dpo_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-7, err_msg=f"{name} {key}")
        np.testing.assert_allclose(jax.grad(lambda a: fn(a)[0])(args[0]), dpo_grad, rtol=1e-6, err_msg=name)


IDENTICAL_PAIR_LOSSES = {
    **PAIRWISE,
    "ipo-lengths": (losses.ipo, {"chosen_lengths": jnp.array([4, 9]), "rejected_lengths": jnp.array([4, 9])}),
}


@pytest.mark.parametrize("name", sorted(IDENTICAL_PAIR_LOSSES))
def test_identical_chosen_and_rejected_give_zero_gradient(name):
    fn, kwargs = IDENTICAL_PAIR_LOSSES[name]
    ref = jnp.array([-11.0, -25.0])

    def loss_of_shared_logps(logps):
        # The same response on both sides: one function of the parameters feeds both inputs.
        return fn(logps, logps, ref, ref, **kwargs)[0]

    grad = jax.grad(loss_of_shared_logps)(jnp.array([-10.0, -31.0]))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    _, metrics = fn(ref - 1, ref - 1, ref, ref, **kwargs)
    assert float(metrics["rewards/accuracies"]) == 0.0


WEIGHTED = {name: (fn, kwargs, ()) for name, (fn, kwargs) in PAIRWISE.items()}
WEIGHTED["ipo-lengths"] = (losses.ipo, {}, ("chosen_lengths", "rejected_lengths"))
WEIGHTED["vpo"] = (losses.vpo, {"mode": "online"}, ("policy_calibration_logps", "reference_calibration_logps"))


def _weighted_call(name, arrays, weights):
    """Calls loss ``name`` on the first four arrays and its per-pair extras (the rest)."""
    fn, kwargs, extra_names = WEIGHTED[name]
    extras = dict(zip(extra_names, arrays[4:]))
    return fn(*arrays[:4], weights=weights, **kwargs, **extras)


@pytest.mark.parametrize("name", sorted(WEIGHTED))
def test_weights_select_pairs_and_uniform_weights_change_nothing(name):
    rng = np.random.default_rng(3)
    full = tuple(jnp.asarray(rng.uniform(-40, -5, 6), jnp.float32) for _ in range(4))
    full += (jnp.array([3, 1, 7, 2, 5, 4]), jnp.array([6, 2, 1, 9, 3, 3]))  # lengths or calibration
    if name == "vpo":
        full = full[:4] + tuple(x.astype(jnp.float32) - 20.0 for x in full[4:])
    # Filler pairs (weight 0) are excluded: the result equals the loss on the real pairs alone.
    weighted_loss, weighted_metrics = _weighted_call(name, full, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    subset_loss, subset_metrics = _weighted_call(name, tuple(a[:4] for a in full), None)
    np.testing.assert_allclose(float(weighted_loss), float(subset_loss), rtol=1e-6)
    assert weighted_metrics.keys() == subset_metrics.keys()
    for key, value in subset_metrics.items():
        np.testing.assert_allclose(float(weighted_metrics[key]), float(value), rtol=1e-6, atol=1e-7, err_msg=key)
    # Uniform weights (any scale) equal the unweighted mean.
    plain_loss, plain_metrics = _weighted_call(name, full, None)
    uniform_loss, uniform_metrics = _weighted_call(name, full, jnp.full(6, 2.5))
    np.testing.assert_allclose(float(uniform_loss), float(plain_loss), rtol=1e-6)
    for key, value in plain_metrics.items():
        np.testing.assert_allclose(float(uniform_metrics[key]), float(value), rtol=1e-6, atol=1e-7, err_msg=key)
    # All weights 0: loss and metrics are 0, the gradient is 0 (not NaN).
    zero_loss, zero_metrics = _weighted_call(name, full, jnp.zeros(6))
    assert float(zero_loss) == 0.0 and all(float(v) == 0.0 for v in zero_metrics.values())
    grad = jax.grad(lambda a: _weighted_call(name, (a, *full[1:]), jnp.zeros(6))[0])(full[0])
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_weighted_mean_is_the_weighted_average():
    pc, pr, rc, rr = (jnp.array(x) for x in ([-10.0, -20.0], [-12.0, -15.0], [-11.0, -21.0], [-11.5, -14.0]))
    per_pair = [float(losses.dpo(*(a[i : i + 1] for a in (pc, pr, rc, rr)))[0]) for i in range(2)]
    loss, _ = losses.dpo(pc, pr, rc, rr, weights=jnp.array([3.0, 1.0]))
    np.testing.assert_allclose(float(loss), (3 * per_pair[0] + per_pair[1]) / 4, rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: losses.rdpo(*example(), epsilon=0.5), r"rdpo: epsilon .* \[0.0, 0.5\), got 0.5"),
        (lambda: losses.rdpo(*example(), epsilon=-0.1), r"rdpo: epsilon .* got -0.1"),
        (lambda: losses.dpo(*example(), label_smoothing=0.7), r"dpo: label_smoothing must lie in \[0.0, 0.5\]"),
        (lambda: losses.dpo(*example(), beta=0.0), r"dpo: beta must be > 0, got 0.0"),
        (lambda: losses.hinge(*example(), beta=-1.0), r"hinge: beta must be > 0"),
        (lambda: losses.ipo(*example(), chosen_lengths=jnp.array([3])), r"ipo: give both chosen_lengths and rejected"),
        (
            lambda: losses.dpo(jnp.zeros(3), jnp.zeros(4), jnp.zeros(3), jnp.zeros(3)),
            r"dpo: .*same shape.*policy_chosen_logps\[3\], policy_rejected_logps\[4\]",
        ),
        (lambda: losses.dpo(*example(), weights=jnp.ones(2)), r"dpo: weights must have the per-pair shape \[1\], got \[2\]"),
    ],
)
def test_bad_hyperparameters_and_shapes_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_checks_do_not_break_jit():
    # Hyperparameters are static Python floats; shapes are static: checks run at trace time.
    fn = jax.jit(lambda *a: losses.rdpo(*a, epsilon=0.2)[0])
    np.testing.assert_allclose(float(fn(*example())), float(losses.rdpo(*example(), epsilon=0.2)[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        jax.jit(lambda *a: losses.rdpo(*a, epsilon=0.6)[0])(*example())


def test_beta_may_be_a_traced_value():
    # e.g. a beta schedule inside a jitted step: range checks are skipped, values still correct.
    fn = jax.jit(lambda beta: losses.dpo(*example(), beta=beta)[0])
    np.testing.assert_allclose(float(fn(jnp.float32(0.1))), 0.620957, atol=1e-6)
