"""Distillation objectives of preference alignment: DCKD and ADPA (docs/losses.md section 5).

Batches are preference pairs (chosen sequences ``0..P-1``, rejected ``P..2P-1`` in
``sequence_ids``) whose tokens carry per-token side arrays (docs/architecture.md), label-aligned
with ``input_ids``:

* DCKD: ``teacher_topk_ids`` int32 and ``teacher_topk_probs`` float32 ``[R, L, K]`` on the
  completion tokens of both responses (``jaxalign.caches.teacher.teacher_topk_loader``);
* ADPA: the rejected sequence is the student's own generation (the state);
  ``candidate_ids`` int32 and ``advantages`` float32 ``[R, L, K]`` on its completion tokens, 0 on
  the chosen ones (``jaxalign.caches.teacher.advantage_loader``).

One forward pass of the student gives, through the chunked unembedding
(``jaxalign.scoring.topk.candidate_logps`` at the candidate ids with the token's own id appended),
its log-probs at the ``K`` candidates and at the token itself; no ``[R, L, V]`` logits exist.
The losses are ``losses.distill.dckd_from_logps`` / ``sft_adpa_from_logps``: the values of
``losses.dckd`` / ``losses.sft_adpa`` on full logits, each term a token mean over the
micro-batch's real chosen (or rejected / state) tokens.

``unit = "tokens"``: the step weights micro-batch ``a`` by its real scored tokens (chosen and
rejected). With one micro-batch the loss is exactly the token means above; under gradient
accumulation each term is exact when every micro-batch has the same share of chosen tokens
(the terms' denominators differ, so no one weight is exact for all of them in general). The
released code (one pair per device, gradient accumulation) averages per-pair token means with
equal weights instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.distill import dckd_from_logps, sft_adpa_from_logps
from jaxalign.objectives.base import Objective, real_token_mask
from jaxalign.scoring.topk import candidate_logps

__all__ = ["ADPA_KEYS", "DCKD_KEYS", "adpa", "dckd"]

DCKD_KEYS = ("teacher_topk_ids", "teacher_topk_probs")
ADPA_KEYS = ("candidate_ids", "advantages")

Batch = dict[str, jax.Array]


def _masks(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Float32 ``[R, L]`` masks of the real scored tokens of chosen and of rejected sequences."""
    real = real_token_mask(batch)
    seq = batch["sequence_ids"]
    p = batch["pair_mask"].shape[0]
    chosen = (seq >= 0) & (seq < p)
    return jnp.where(chosen, real, 0.0), jnp.where(seq >= p, real, 0.0)


def _student_logps(forward, params, batch: Batch, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(token log-probs [R, L], log-probs at ids [R, L, K])`` of the student, one pass."""
    both = candidate_logps(forward, params["model"], batch, jnp.concatenate([ids, batch["input_ids"][..., None]], -1))
    return both[..., -1], both[..., :-1]


def dckd(sft_weight: float = 1.0, chosen_kl_weight: float = 0.1, rejected_kl_weight: float = 0.1) -> Objective:
    """DCKD: ``sft_weight * NLL(chosen) + chosen_kl_weight * KL(chosen) + rejected_kl_weight *
    KL(rejected)``, ``KL`` the top-k + residual forward KL(teacher || student) per token."""

    def loss_fn(forward, params, batch, reference):
        chosen, rejected = _masks(batch)
        tokens, student = _student_logps(forward, params, batch, batch["teacher_topk_ids"])
        probs = batch["teacher_topk_probs"]
        return dckd_from_logps(tokens, student, probs, chosen, student, probs, rejected, sft_weight=sft_weight,
                               chosen_kl_weight=chosen_kl_weight, rejected_kl_weight=rejected_kl_weight)

    return Objective(name="dckd", loss_fn=loss_fn, unit="tokens", batch_keys=DCKD_KEYS)


def adpa(sft_weight: float = 1.0, adpa_weight: float = 1.6, clip: bool = False) -> Objective:
    """ADPA: ``sft_weight * NLL(chosen) + adpa_weight * L_ADPA(states)``, ``L_ADPA`` minus the
    student's expected advantage ``sum_a p_S(a | s_t) A(s_t, a)`` over the candidates per state
    token; ``clip``: the released code's clamping of the advantages (``losses.adpa``)."""

    def loss_fn(forward, params, batch, reference):
        chosen, states = _masks(batch)
        tokens, student = _student_logps(forward, params, batch, batch["candidate_ids"])
        return sft_adpa_from_logps(tokens, chosen, student, batch["advantages"], states, sft_weight=sft_weight,
                                   adpa_weight=adpa_weight, clip_advantages=clip)

    return Objective(name="adpa", loss_fn=loss_fn, unit="tokens", batch_keys=ADPA_KEYS)
