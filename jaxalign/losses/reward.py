"""Reward-model loss: the Bradley-Terry pairwise likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import as_float, check_weights, same_shape
from jaxalign.losses.reductions import weighted_mean


def bradley_terry(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022).

    Per pair: ``L = -log sigma(r_w - r_l - margin)`` with scalar rewards ``r`` of the chosen and
    rejected responses ([P]). ``margin`` (scalar or [P], default none) asks for a minimum reward
    gap, as in Llama 2's margin loss. Metrics: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins`` (mean ``r_w - r_l``), ``rewards/accuracies`` (fraction with
    ``r_w > r_l``, ties count 0); all weighted means with ``weights``.
    """
    shape = same_shape("bradley_terry", {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards})
    check_weights("bradley_terry", weights, shape)
    named = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    if margin is not None:
        if jnp.ndim(margin) != 0 and tuple(jnp.shape(margin)) != shape:
            raise ValueError(
                f"losses.bradley_terry: margin must be a scalar or have the pairs' shape {list(shape)}, "
                f"got {list(jnp.shape(margin))}"
            )
        named["margin"] = margin
    cast = as_float(named)
    chosen, rejected = cast["chosen_rewards"], cast["rejected_rewards"]
    gap = chosen - rejected
    per_pair = jax.nn.softplus(-(gap - cast.get("margin", 0.0)))
    chosen, rejected, gap = (jax.lax.stop_gradient(x) for x in (chosen, rejected, gap))
    metrics = {
        "rewards/chosen": weighted_mean(chosen, weights),
        "rewards/rejected": weighted_mean(rejected, weights),
        "rewards/margins": weighted_mean(gap, weights),
        "rewards/accuracies": weighted_mean((gap > 0).astype(gap.dtype), weights),
    }
    return weighted_mean(per_pair, weights), metrics
