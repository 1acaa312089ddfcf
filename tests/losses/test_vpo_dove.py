"""VPO (both modes, regulariser, gradient) and DOVE (joint log-probs, reduction to DPO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

PAIR = tuple(jnp.array([x]) for x in (-10.0, -12.0, -11.0, -11.5))  # docs/losses.md running example
CAL_POLICY, CAL_REF = jnp.array([-20.0]), jnp.array([-19.0])


@pytest.mark.parametrize("mode, expected, sign", [("online", 0.610957, 1.0), ("offline", 0.630957, -1.0)])
def test_vpo_golden_values_and_calibration_gradient(mode, expected, sign):
    # lambda = alpha * beta = 0.01; log-ratio form of docs/losses.md 3.3.
    def loss_fn(cal_policy):
        return losses.vpo(
            *PAIR,
            policy_calibration_logps=cal_policy,
            reference_calibration_logps=CAL_REF,
            beta=0.1,
            alpha=0.1,
            mode=mode,
        )

    loss, metrics = loss_fn(CAL_POLICY)
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)
    np.testing.assert_allclose(float(metrics["vpo/regularizer"]), sign * 0.01 * -1.0, atol=1e-7)
    np.testing.assert_allclose(float(metrics["vpo/dpo_loss"]), 0.620957, atol=1e-6)
    np.testing.assert_allclose(float(metrics["vpo/calibration_logratio"]), -1.0, atol=1e-7)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), 0.15, atol=1e-6)
    # d L / d logp_pi(y_cal) = sign * lambda.
    grad = jax.grad(lambda c: loss_fn(c)[0])(CAL_POLICY)
    np.testing.assert_allclose(float(grad[0]), sign * 0.01, atol=1e-7)
    # The reference calibration log-probs shift the loss, not the policy gradient.
    grad_ref = jax.grad(lambda r: losses.vpo(*PAIR, policy_calibration_logps=CAL_POLICY,
                                             reference_calibration_logps=r, mode=mode)[0])(CAL_REF)
    np.testing.assert_allclose(float(grad_ref[0]), -sign * 0.01, atol=1e-7)


def test_vpo_regulariser_is_a_mean_over_calibration_samples():
    # Calibration samples need not be one per pair when no weights are given.
    cal_policy, cal_ref = jnp.array([-20.0, -5.0, -8.0]), jnp.array([-19.0, -6.0, -8.0])
    loss, metrics = losses.vpo(*PAIR, policy_calibration_logps=cal_policy, reference_calibration_logps=cal_ref,
                               beta=0.2, alpha=0.5, mode="offline")
    regulariser = -1.0 * 0.5 * 0.2 * np.mean([-1.0, 1.0, 0.0])
    np.testing.assert_allclose(float(metrics["vpo/regularizer"]), regulariser, atol=1e-7)
    dpo_loss, _ = losses.dpo(*PAIR, beta=0.2)
    np.testing.assert_allclose(float(loss), float(dpo_loss) + regulariser, atol=1e-6)


def test_vpo_input_errors():
    with pytest.raises(ValueError, match=r"vpo: mode must be one of \['offline', 'online'\], got 'optimistic'"):
        losses.vpo(*PAIR, policy_calibration_logps=CAL_POLICY, reference_calibration_logps=CAL_REF, mode="optimistic")
    with pytest.raises(ValueError, match=r"vpo: with weights, the calibration log-probs must have the pairs' shape"):
        losses.vpo(*PAIR, policy_calibration_logps=jnp.zeros(3), reference_calibration_logps=jnp.zeros(3),
                   weights=jnp.ones(1))
    with pytest.raises(ValueError, match=r"vpo: .*same shape"):
        losses.vpo(*PAIR, policy_calibration_logps=jnp.zeros(3), reference_calibration_logps=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"vpo: alpha must lie in"):
        losses.vpo(*PAIR, policy_calibration_logps=CAL_POLICY, reference_calibration_logps=CAL_REF, alpha=-0.1)


def _joint(prompt_logps, response_logps):
    return jnp.array([prompt_logps + response_logps])


def test_dove_golden_joint_preference():
    # docs/losses.md 4.3: different prompts, joint log-ratios 2.0 and -1.5, h = 3.5.
    chosen_policy, chosen_ref = _joint(-30.0, -10.0), _joint(-31.0, -11.0)
    rejected_policy, rejected_ref = _joint(-25.0, -12.0), _joint(-24.0, -11.5)
    loss, metrics = losses.dove(chosen_policy, rejected_policy, chosen_ref, rejected_ref, beta=0.1)
    np.testing.assert_allclose(float(loss), 0.533382, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), 0.35, atol=1e-6)
    # d L / d logp_pi(x_w, y_w) = -beta * sigma(-beta h).
    grad = jax.grad(lambda c: losses.dove(c, rejected_policy, chosen_ref, rejected_ref)[0])(chosen_policy)
    np.testing.assert_allclose(float(grad[0]), -0.1 / (1 + np.exp(0.35)), atol=1e-7)


def test_dove_with_equal_prompts_reduces_to_dpo():
    # Same prompt on both sides (-30 under the policy, -31 under the reference): the prompt terms cancel.
    responses = (jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]), jnp.array([-11.5]))
    prompts = (-30.0, -30.0, -31.0, -31.0)
    joint = tuple(p + r for p, r in zip(prompts, responses))
    dove_loss, dove_metrics = losses.dove(*joint)
    dpo_loss, dpo_metrics = losses.dpo(*responses)
    np.testing.assert_allclose(float(dove_loss), 0.620957, atol=1e-6)
    np.testing.assert_allclose(float(dove_loss), float(dpo_loss), atol=1e-7)
    for key in ("rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(float(dove_metrics[key]), float(dpo_metrics[key]), atol=1e-6)
    # The individual joint rewards carry the shared prompt log-ratio (+1.0, times beta).
    for key in ("rewards/chosen", "rewards/rejected"):
        np.testing.assert_allclose(float(dove_metrics[key]), float(dpo_metrics[key]) + 0.1, atol=1e-6)
    # Gradients wrt the response log-probs agree too.
    dove_grad = jax.grad(lambda c, r: losses.dove(prompts[0] + c, prompts[1] + r, *joint[2:])[0], argnums=(0, 1))(
        *responses[:2]
    )
    dpo_grad = jax.grad(lambda c, r: losses.dpo(c, r, *responses[2:])[0], argnums=(0, 1))(*responses[:2])
    np.testing.assert_allclose(np.concatenate(dove_grad), np.concatenate(dpo_grad), atol=1e-7)
