"""Supervised fine-tuning: token-mean negative log-likelihood of the scored tokens.

Filler examples are excluded; under gradient accumulation the loss is normalised by the
global batch's real scored tokens (``unit = "tokens"``).
"""

from __future__ import annotations

from jaxalign import losses
from jaxalign.objectives.base import Objective, real_token_mask

__all__ = ["sft"]


def _loss(forward, params, batch, reference):
    tokens = forward.token_logps(params["model"], batch)
    loss, metrics = losses.sft(tokens, real_token_mask(batch))
    return loss, {k: v for k, v in metrics.items() if k != "sft/tokens"}  # a count, not a mean: the step logs num_tokens


def sft() -> Objective:
    """The SFT objective (one sequence per example)."""
    return Objective(name="sft", loss_fn=_loss, unit="tokens", sequences_per_pair=1)
