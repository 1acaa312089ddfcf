"""Pairwise preference losses on sequence log-probs: DPO (and cDPO), IPO, hinge, robust DPO.

Every function takes the four per-pair sequence log-probs (sums over the completion tokens,
shape ``[P]``) of the policy and of the reference on the chosen (``y_w``) and rejected (``y_l``)
responses and returns ``(loss, metrics)``: ``loss`` is the (weighted) mean over pairs of the
per-pair loss, ``metrics`` a flat dict of scalars with TRL's names (see ``preference_metrics``).

Notation: ``c = logp_pi(y_w) - logp_ref(y_w)``, ``r = logp_pi(y_l) - logp_ref(y_l)``,
``h = c - r``. ``-log sigma(z)`` is evaluated as ``softplus(-z)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import as_float, check_positive, check_range, check_weights, same_shape
from jaxalign.losses.reductions import weighted_mean

Metrics = dict[str, jax.Array]


class PairLogps(NamedTuple):
    """The four per-pair log-probs cast to the compute dtype, plus the optional weights."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    reference_chosen: jax.Array
    reference_rejected: jax.Array
    weights: jax.Array | None

    @property
    def chosen_logratios(self) -> jax.Array:
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected_logratios(self) -> jax.Array:
        return self.policy_rejected - self.reference_rejected


def pair_logps(
    loss: str,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    weights: jax.Array | None,
    **extra: jax.Array,
) -> tuple[PairLogps, dict[str, jax.Array]]:
    """Checks shapes (all ``[P]``-shaped arrays equal) and casts to the compute dtype.

    ``extra`` are further per-pair arrays of the loss (e.g. IPO's lengths), returned cast too.
    """
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
        **extra,
    }
    shape = same_shape(loss, named)
    check_weights(loss, weights, shape)
    cast = as_float(named)
    pairs = PairLogps(
        cast.pop("policy_chosen_logps"),
        cast.pop("policy_rejected_logps"),
        cast.pop("reference_chosen_logps"),
        cast.pop("reference_rejected_logps"),
        None if weights is None else jnp.asarray(weights),
    )
    return pairs, cast


def preference_metrics(pairs: PairLogps, beta: float) -> Metrics:
    """TRL's DPO metrics, as (weighted) means over pairs, without gradient.

    ``rewards/chosen = beta * c``, ``rewards/rejected = beta * r``, ``rewards/margins`` their
    difference, ``rewards/accuracies`` the fraction with chosen reward strictly greater (ties
    count 0), ``logps/chosen`` and ``logps/rejected`` the policy's summed log-probs.
    """
    pairs = jax.tree.map(jax.lax.stop_gradient, pairs)
    chosen_rewards = beta * pairs.chosen_logratios
    rejected_rewards = beta * pairs.rejected_logratios
    accuracies = (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)
    w = pairs.weights
    return {
        "rewards/chosen": weighted_mean(chosen_rewards, w),
        "rewards/rejected": weighted_mean(rejected_rewards, w),
        "rewards/margins": weighted_mean(chosen_rewards - rejected_rewards, w),
        "rewards/accuracies": weighted_mean(accuracies, w),
        "logps/chosen": weighted_mean(pairs.policy_chosen, w),
        "logps/rejected": weighted_mean(pairs.policy_rejected, w),
    }


def sigmoid_loss(margin: jax.Array, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair (conservative) DPO loss ``(1-eps) softplus(-beta h) + eps softplus(beta h)``."""
    return (1.0 - label_smoothing) * jax.nn.softplus(-beta * margin) + label_smoothing * jax.nn.softplus(
        beta * margin
    )


def dpo(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Sigmoid DPO (Rafailov et al. 2023, Eq. 7); cDPO when ``label_smoothing > 0``.

    Per pair: ``L = -log sigma(beta h)``. With ``label_smoothing = eps`` (cDPO, E. Mitchell's
    note; labels assumed flipped with probability eps) it is
    ``(1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h)``, whose minimum sits at the
    finite margin ``beta h = log((1 - eps) / eps)``. ``eps = 0`` is plain DPO.

    Defaults: ``beta = 0.1`` (paper and TRL), ``label_smoothing = 0`` (``eps`` must lie in
    [0, 0.5]). ``weights`` ([P], optional) turn the mean over pairs and every metric into a
    weighted mean (0 when the weights sum to 0). Note: TRL >= 0.29 no longer applies label
    smoothing to its ``sigmoid`` loss; this function keeps the cDPO form.
    """
    check_positive("dpo", "beta", beta)
    check_range("dpo", "label_smoothing", label_smoothing, 0.0, 0.5)
    pairs, _ = pair_logps(
        "dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, weights
    )
    per_pair = sigmoid_loss(pairs.chosen_logratios - pairs.rejected_logratios, beta, label_smoothing)
    return weighted_mean(per_pair, pairs.weights), preference_metrics(pairs, beta)


def cdpo(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Conservative DPO: ``dpo`` with labels assumed flipped at rate ``label_smoothing``
    (default 0.1, as in ``configs/cdpo.py``); see ``dpo`` for the formula."""
    return dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta=beta, label_smoothing=label_smoothing, weights=weights)


def ipo(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """IPO (Azar et al. 2024, Eq. 17) with ``beta`` in the role of tau.

    Per pair: ``L = (h - 1 / (2 beta))^2``. Without lengths ``h = c - r`` uses the summed
    log-ratios (the original DPO repository's form). With ``chosen_lengths`` and
    ``rejected_lengths`` (completion-token counts, [P], clamped to >= 1) each log-ratio is
    divided by its own length, ``h = c / len_w - r / len_l``: TRL's length-normalised IPO
    (the ``ipo`` loss type of TRL's DPOTrainer). Give both lengths or neither.

    Default ``beta = 0.1``. Metrics are the DPO metrics on the unnormalised log-ratios (as TRL).
    """
    check_positive("ipo", "beta", beta)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("losses.ipo: give both chosen_lengths and rejected_lengths, or neither")
    lengths = {} if chosen_lengths is None else {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    pairs, extra = pair_logps(
        "ipo",
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        weights,
        **lengths,
    )
    chosen, rejected = pairs.chosen_logratios, pairs.rejected_logratios
    if extra:
        chosen = chosen / jnp.maximum(extra["chosen_lengths"], 1)
        rejected = rejected / jnp.maximum(extra["rejected_lengths"], 1)
    per_pair = jnp.square(chosen - rejected - 1.0 / (2.0 * beta))
    return weighted_mean(per_pair, pairs.weights), preference_metrics(pairs, beta)


def hinge(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Hinge loss of SLiC (Zhao et al. 2023) / RSO (Liu et al. 2024): ``max(0, 1 - beta h)``.

    ``1 / beta`` is the target margin of the log-ratio difference. Default ``beta = 0.1``.
    """
    check_positive("hinge", "beta", beta)
    pairs, _ = pair_logps(
        "hinge", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, weights
    )
    per_pair = jax.nn.relu(1.0 - beta * (pairs.chosen_logratios - pairs.rejected_logratios))
    return weighted_mean(per_pair, pairs.weights), preference_metrics(pairs, beta)


def rdpo(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    epsilon: float = 0.1,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Provably robust DPO (Chowdhury, Kini, Natarajan, ICML 2024): unbiased under label flips.

    With labels flipped independently with known rate ``epsilon`` in [0, 0.5), per pair:
    ``L = [(1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)] / (1 - 2 eps)``.
    Its expectation over the flip equals the clean DPO loss; unlike cDPO the gradient weight
    never changes sign, and the loss is unbounded below for large margins (negative values are
    expected). Equals TRL's ``robust`` loss type with ``label_smoothing = epsilon``.

    Defaults: ``beta = 0.1``, ``epsilon = 0.1``. ``epsilon = 0`` is plain DPO.
    """
    check_positive("rdpo", "beta", beta)
    check_range("rdpo", "epsilon (the label-flip rate)", epsilon, 0.0, 0.5, high_inclusive=False)
    pairs, _ = pair_logps(
        "rdpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, weights
    )
    margin = pairs.chosen_logratios - pairs.rejected_logratios
    per_pair = ((1.0 - epsilon) * jax.nn.softplus(-beta * margin) - epsilon * jax.nn.softplus(beta * margin)) / (
        1.0 - 2.0 * epsilon
    )
    return weighted_mean(per_pair, pairs.weights), preference_metrics(pairs, beta)
