"""DOVE / JPO: preference optimisation over joint instruction-response pairs (Bansal et al. 2024)."""

from __future__ import annotations

import jax

from jaxalign.losses._checks import check_positive
from jaxalign.losses.preference import Metrics, pair_logps, preference_metrics, sigmoid_loss
from jaxalign.losses.reductions import weighted_mean


def dove(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """DOVE: the DPO objective on **joint** log-probs of prompt and response.

    A preference ``(x_w, y_w) > (x_l, y_l)`` may compare responses to different prompts. The
    inputs are joint sequence log-probs ``log pi(x, y) = log pi(x) + log pi(y | x)``: sums over
    the prompt tokens (all but the first token of the row, which is never scored) and the
    response tokens, which is what the data pipeline's DOVE mask selects. Per pair:

        ``L = -log sigma(beta * [log pi(x_w, y_w) / pi_ref(x_w, y_w) - log pi(x_l, y_l) / pi_ref(x_l, y_l)])``

    With equal prompts ``x_w = x_l`` the prompt log-ratio appears in both terms and cancels, so
    the loss and its gradient reduce exactly to DPO on the response log-probs. Metrics are
    DPO's, computed on the joint log-ratios. Default ``beta = 0.1`` (the official code's).
    """
    check_positive("dove", "beta", beta)
    pairs, _ = pair_logps(
        "dove", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, weights
    )
    per_pair = sigmoid_loss(pairs.chosen_logratios - pairs.rejected_logratios, beta)
    return weighted_mean(per_pair, pairs.weights), preference_metrics(pairs, beta)
