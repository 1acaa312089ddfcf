"""VPO: value-incentivized preference optimization (Cen et al., ICLR 2025)."""

from __future__ import annotations

import jax

from jaxalign.losses._checks import as_float, check_positive, check_range, same_shape
from jaxalign.losses.preference import Metrics, pair_logps, preference_metrics, sigmoid_loss
from jaxalign.losses.reductions import weighted_mean

MODE_SIGNS = {"online": 1.0, "offline": -1.0}


def vpo(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    policy_calibration_logps: jax.Array,
    reference_calibration_logps: jax.Array,
    beta: float = 0.1,
    alpha: float = 0.1,
    mode: str = "offline",
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """DPO plus VPO's value regulariser on calibration samples.

    ``L = L_DPO + sign * alpha * beta * mean(logp_pi(y_cal) - logp_ref(y_cal))``

    where ``y_cal`` are calibration responses (e.g. one sample of the reference per prompt, or
    the chosen responses), their log-probs summed over the completion like the pair log-probs.
    ``sign = +1`` for ``mode="online"`` (optimism: pushes the policy's probability of the
    calibration samples down, i.e. away from the reference) and ``-1`` for ``mode="offline"``
    (pessimism: pulls it up). The reference term has no gradient in the policy; it makes the
    regulariser a log-ratio so that it is 0 at initialisation. ``alpha = 0`` is exactly DPO.

    The regulariser is logged as ``vpo/regularizer`` (the signed term added to the loss) next
    to ``vpo/dpo_loss`` and ``vpo/calibration_logratio`` (the unsigned mean log-ratio).

    Calibration arrays share one shape; with ``weights`` they must have the pairs' shape [P]
    (one calibration sample per pair), so that filler pairs are excluded from both terms.
    Defaults: ``beta = 0.1``, ``alpha = 0.1``, ``mode = "offline"``.
    """
    if mode not in MODE_SIGNS:
        raise ValueError(f"losses.vpo: mode must be one of {sorted(MODE_SIGNS)}, got {mode!r}")
    check_positive("vpo", "beta", beta)
    check_range("vpo", "alpha", alpha, 0.0, float("inf"))
    pairs, _ = pair_logps(
        "vpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, weights
    )
    calibration = {
        "policy_calibration_logps": policy_calibration_logps,
        "reference_calibration_logps": reference_calibration_logps,
    }
    calibration_shape = same_shape("vpo", calibration)
    pair_shape = pairs.policy_chosen.shape
    if weights is not None and calibration_shape != pair_shape:
        raise ValueError(
            f"losses.vpo: with weights, the calibration log-probs must have the pairs' shape {list(pair_shape)}, "
            f"got {list(calibration_shape)}"
        )
    cal = as_float(calibration)
    calibration_logratio = weighted_mean(
        cal["policy_calibration_logps"] - cal["reference_calibration_logps"], pairs.weights
    )
    regularizer = MODE_SIGNS[mode] * alpha * beta * calibration_logratio
    dpo_loss = weighted_mean(sigmoid_loss(pairs.chosen_logratios - pairs.rejected_logratios, beta), pairs.weights)
    metrics = preference_metrics(pairs, beta)
    metrics.update(
        {
            "vpo/dpo_loss": jax.lax.stop_gradient(dpo_loss),
            "vpo/regularizer": jax.lax.stop_gradient(regularizer),
            "vpo/calibration_logratio": jax.lax.stop_gradient(calibration_logratio),
        }
    )
    return dpo_loss + regularizer, metrics
