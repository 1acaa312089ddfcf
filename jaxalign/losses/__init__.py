"""Pure JAX loss functions for preference alignment, log-prob utilities and a registry.

    from jaxalign import losses
    loss, metrics = losses.dpo(policy_chosen_logps, policy_rejected_logps,
                               reference_chosen_logps, reference_rejected_logps, beta=0.1)

Every loss returns ``(loss, metrics)``: a scalar and a flat dict of scalars. See docs/losses.md.
"""

from jaxalign.losses.distill import adpa, dckd, sft_adpa, topk_kl
from jaxalign.losses.dove import dove
from jaxalign.losses.logprobs import (
    align_logits_to_labels,
    segment_logps,
    sequence_logps,
    token_logps,
    token_logps_from_hidden,
)
from jaxalign.losses.preference import cdpo, dpo, hinge, ipo, preference_metrics, rdpo
from jaxalign.losses.registry import get, names
from jaxalign.losses.reward import bradley_terry
from jaxalign.losses.sft import sft
from jaxalign.losses.vpo import vpo

__all__ = [
    "adpa",
    "align_logits_to_labels",
    "bradley_terry",
    "dckd",
    "dove",
    "cdpo",
    "dpo",
    "get",
    "hinge",
    "ipo",
    "names",
    "preference_metrics",
    "rdpo",
    "segment_logps",
    "sequence_logps",
    "sft",
    "sft_adpa",
    "token_logps",
    "token_logps_from_hidden",
    "topk_kl",
    "vpo",
]
