"""Supervised fine-tuning loss: token-mean negative log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import compute_dtype
from jaxalign.losses.reductions import masked_mean


def sft(token_logps: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean NLL: ``L = -sum_t m_t * logp_t / sum_t m_t`` over all rows (0 for an empty mask).

    ``token_logps`` are label-aligned per-token log-probs (``jaxalign.losses.token_logps``) and
    ``loss_mask`` selects the tokens that count, e.g. completion tokens; the mean is over the
    tokens of the whole batch (not a mean of per-row means). Metrics: ``sft/nll`` (= the loss)
    and ``sft/tokens`` (the number of counted tokens).
    """
    if token_logps.shape != loss_mask.shape:
        raise ValueError(
            f"losses.sft: token_logps {list(token_logps.shape)} and loss_mask {list(loss_mask.shape)} "
            "must have the same shape"
        )
    token_logps = token_logps.astype(compute_dtype(token_logps))
    nll = -masked_mean(token_logps, loss_mask)
    tokens = jnp.sum(loss_mask.astype(token_logps.dtype))
    return nll, {"sft/nll": jax.lax.stop_gradient(nll), "sft/tokens": tokens}
