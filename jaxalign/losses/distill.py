"""Distillation losses of "Advantage-Guided Distillation for Preference Alignment in Small
Language Models" (Gao et al., ICLR 2025): top-k forward KL, DCKD and ADPA.

Alignment convention: every per-position array here is **label-aligned**. ``student_logits[...,
t, :]`` is the student's distribution for the token at position ``t`` (the model's logits at
``t - 1``; use ``jaxalign.losses.align_logits_to_labels`` on raw model logits), and the teacher's
top-k ids/probs, the candidate ids/advantages, the labels and the mask at ``t`` describe that
same token, as in the batch keys ``teacher_topk_*``, ``candidate_ids``, ``advantages`` and
``loss_mask`` of docs/architecture.md. Leading axes (``...``) are free, e.g. ``[B, L, V]``.
Means are over the valid (mask = 1) positions of all rows together; 0 when none is valid.

``dckd_from_logps`` and ``sft_adpa_from_logps`` are the same objectives on the student's
log-probs already gathered at the candidate ids and labels (``[..., L, K]`` and ``[..., L]``),
for callers that never form full logits (``jaxalign.objectives.distill``); ``dckd`` and
``sft_adpa`` gather those from full logits and call them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import compute_dtype
from jaxalign.losses.reductions import masked_mean
from jaxalign.losses.sft import sft

Metrics = dict[str, jax.Array]

PROB_MIN = 1e-8  # lower clamp of teacher (and clipped-advantage) probabilities
PROB_MAX = 1.0 - 1e-8  # upper clamp of every probability
STUDENT_PROB_MIN = 1e-7  # lower clamp of student probabilities


def _check_positions(loss: str, logits: jax.Array, mask: jax.Array, **per_candidate: jax.Array) -> None:
    """``logits [..., L, V]``, ``mask [..., L]`` and each ``[..., L, K]`` candidate array agree."""
    positions = tuple(logits.shape[:-1])
    problems = []
    if logits.ndim < 2:
        problems.append(f"student logits must be [..., length, vocab], got {list(logits.shape)}")
    if tuple(mask.shape) != positions:
        problems.append(f"mask must have shape {list(positions)}, got {list(mask.shape)}")
    shapes = {name: tuple(a.shape) for name, a in per_candidate.items()}
    for name, shape in shapes.items():
        if shape[:-1] != positions:
            problems.append(f"{name} must have shape {list(positions)} + [K], got {list(shape)}")
    for name, a in per_candidate.items():
        if name.endswith("_ids") and not jnp.issubdtype(a.dtype, jnp.integer):
            problems.append(f"{name} must be integer token ids, got dtype {a.dtype}")
    if len(set(shapes.values())) > 1:
        problems.append("candidate arrays differ: " + ", ".join(f"{n}{list(s)}" for n, s in shapes.items()))
    if problems:
        raise ValueError(f"losses.{loss}: " + "; ".join(problems))


def _gathered_logps(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Student ``log softmax(logits)`` at ``ids`` ([..., K]), in the compute dtype."""
    logits = logits.astype(compute_dtype(logits))
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.take_along_axis(logits, ids, axis=-1) - lse


def _with_residual(probs: jax.Array) -> jax.Array:
    """Appends the residual bin ``1 - sum(probs)`` to ``[..., K]`` probabilities."""
    return jnp.concatenate([probs, 1.0 - jnp.sum(probs, axis=-1, keepdims=True)], axis=-1)


def _topk_kl(student_logps: jax.Array, teacher_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """``topk_kl``'s loss from the student's log-probs at the teacher's ids ``[..., K]``."""
    student = jnp.exp(student_logps)
    teacher = jnp.clip(_with_residual(jnp.asarray(teacher_probs).astype(student.dtype)), PROB_MIN, PROB_MAX)
    student = jnp.clip(_with_residual(student), STUDENT_PROB_MIN, PROB_MAX)
    return masked_mean(jnp.sum(teacher * (jnp.log(teacher) - jnp.log(student)), axis=-1), mask)


def _adpa(student_logps: jax.Array, advantages: jax.Array, mask: jax.Array, clip_advantages: bool) -> jax.Array:
    """``adpa``'s loss from the student's log-probs at the candidate ids ``[..., K]``."""
    student = jnp.exp(student_logps)
    advantages = jnp.asarray(advantages).astype(student.dtype)
    expected = jnp.sum(student * advantages, axis=-1)
    if clip_advantages:
        residual = jnp.maximum(1.0 - jnp.sum(student, axis=-1), 0.0)
        expected = jnp.sum(student * jnp.clip(advantages, PROB_MIN, PROB_MAX), axis=-1) + PROB_MIN * residual
    return -masked_mean(expected, mask)


def _check_gathered(loss: str, mask: jax.Array, per_token: dict[str, jax.Array],
                    per_candidate: dict[str, jax.Array]) -> None:
    """Each ``per_token`` array has ``mask``'s shape ``[..., L]``, each ``per_candidate`` one ``[..., L, K]``."""
    positions = tuple(mask.shape)
    problems = [f"{name} must have the mask's shape {list(positions)}, got {list(a.shape)}"
                for name, a in per_token.items() if tuple(a.shape) != positions]
    shapes = {name: tuple(a.shape) for name, a in per_candidate.items()}
    problems += [f"{name} must have shape {list(positions)} + [K], got {list(shape)}"
                 for name, shape in shapes.items() if shape[:-1] != positions]
    if len(set(shapes.values())) > 1:
        problems.append("candidate arrays differ: " + ", ".join(f"{n}{list(s)}" for n, s in shapes.items()))
    if problems:
        raise ValueError(f"losses.{loss}: " + "; ".join(problems))


def _label_logps(loss: str, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-probs ``[..., L]`` of ``labels`` under label-aligned ``logits``."""
    positions = tuple(logits.shape[:-1])
    if tuple(labels.shape) != positions or tuple(mask.shape) != positions:
        raise ValueError(
            f"losses.{loss}: chosen_labels and chosen_mask must have shape {list(positions)}, "
            f"got {list(labels.shape)} and {list(mask.shape)}"
        )
    return _gathered_logps(logits, labels[..., None])[..., 0]


def topk_kl(
    student_logits: jax.Array,
    teacher_topk_ids: jax.Array,
    teacher_topk_probs: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, Metrics]:
    """Forward KL(teacher || student) on the teacher's top-k tokens plus one residual bin.

    Per position, with the teacher's probabilities ``p_T`` on its top-k ids and
    ``p_T(rest) = 1 - sum_k p_T(k)``, and the student's full-softmax probabilities ``p_S`` on
    the same ids and ``p_S(rest) = 1 - sum_k p_S(k)``:

        ``KL_t = sum_{k in top-k + rest} p_T(k) * (log p_T(k) - log p_S(k))``

    with ``p_T`` clamped to [1e-8, 1 - 1e-8] and ``p_S`` to [1e-7, 1 - 1e-8] (as in the
    released ADPA code). Loss = mean of ``KL_t`` over valid positions. Shapes: logits
    ``[..., L, V]``, ids and probs ``[..., L, K]``, mask ``[..., L]``, all label-aligned (module
    docstring). Metrics: ``distill/kl`` and ``distill/tokens``.
    """
    _check_positions(
        "topk_kl", student_logits, mask, teacher_topk_ids=teacher_topk_ids, teacher_topk_probs=teacher_topk_probs
    )
    kl = _topk_kl(_gathered_logps(student_logits, teacher_topk_ids), teacher_topk_probs, mask)
    tokens = jnp.sum(jnp.asarray(mask).astype(kl.dtype))
    return kl, {"distill/kl": jax.lax.stop_gradient(kl), "distill/tokens": tokens}


def dckd(
    chosen_logits: jax.Array,
    chosen_labels: jax.Array,
    chosen_teacher_topk_ids: jax.Array,
    chosen_teacher_topk_probs: jax.Array,
    chosen_mask: jax.Array,
    rejected_logits: jax.Array,
    rejected_teacher_topk_ids: jax.Array,
    rejected_teacher_topk_probs: jax.Array,
    rejected_mask: jax.Array,
    *,
    sft_weight: float = 1.0,
    chosen_kl_weight: float = 0.1,
    rejected_kl_weight: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """Dual-constrained knowledge distillation (DCKD): SFT on chosen + top-k KL on both responses.

        ``L = sft_weight * NLL(y_w) + chosen_kl_weight * KL(y_w) + rejected_kl_weight * KL(y_l)``

    ``NLL(y_w)`` is the token-mean NLL of ``chosen_labels`` (the token ids, label-aligned: the
    batch's ``input_ids``) over ``chosen_mask``; ``KL(y)`` is ``topk_kl`` of the student against
    the (DPO-aligned) teacher's top-k distribution over that response's valid positions.
    Defaults are the released recipe's (``student_dckd.yaml``): 1.0, 0.1, 0.1. Metrics:
    ``dckd/sft``, ``dckd/chosen_kl``, ``dckd/rejected_kl``.
    """
    labels = _label_logps("dckd", chosen_logits, chosen_labels, chosen_mask)
    _check_positions("dckd", chosen_logits, chosen_mask, chosen_teacher_topk_ids=chosen_teacher_topk_ids,
                     chosen_teacher_topk_probs=chosen_teacher_topk_probs)
    _check_positions("dckd", rejected_logits, rejected_mask, rejected_teacher_topk_ids=rejected_teacher_topk_ids,
                     rejected_teacher_topk_probs=rejected_teacher_topk_probs)
    return dckd_from_logps(
        labels, _gathered_logps(chosen_logits, chosen_teacher_topk_ids), chosen_teacher_topk_probs, chosen_mask,
        _gathered_logps(rejected_logits, rejected_teacher_topk_ids), rejected_teacher_topk_probs, rejected_mask,
        sft_weight=sft_weight, chosen_kl_weight=chosen_kl_weight, rejected_kl_weight=rejected_kl_weight,
    )


def dckd_from_logps(
    chosen_label_logps: jax.Array,
    chosen_student_logps: jax.Array,
    chosen_teacher_topk_probs: jax.Array,
    chosen_mask: jax.Array,
    rejected_student_logps: jax.Array,
    rejected_teacher_topk_probs: jax.Array,
    rejected_mask: jax.Array,
    *,
    sft_weight: float = 1.0,
    chosen_kl_weight: float = 0.1,
    rejected_kl_weight: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """``dckd`` on gathered student log-probs: ``chosen_label_logps [..., L]`` of the chosen
    tokens, ``*_student_logps [..., L, K]`` = ``log_softmax(student logits)`` at the teacher's
    top-k ids of that response (the residual bin is ``1 - sum exp``). Same loss and metrics."""
    _check_gathered("dckd_from_logps", chosen_mask, {"chosen_label_logps": chosen_label_logps},
                    {"chosen_student_logps": chosen_student_logps,
                     "chosen_teacher_topk_probs": chosen_teacher_topk_probs})
    _check_gathered("dckd_from_logps", rejected_mask, {}, {"rejected_student_logps": rejected_student_logps,
                                                           "rejected_teacher_topk_probs": rejected_teacher_topk_probs})
    nll = sft(chosen_label_logps, chosen_mask)[0]
    chosen_kl = _topk_kl(chosen_student_logps, chosen_teacher_topk_probs, chosen_mask)
    rejected_kl = _topk_kl(rejected_student_logps, rejected_teacher_topk_probs, rejected_mask)
    loss = sft_weight * nll + chosen_kl_weight * chosen_kl + rejected_kl_weight * rejected_kl
    metrics = {"dckd/sft": nll, "dckd/chosen_kl": chosen_kl, "dckd/rejected_kl": rejected_kl}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def adpa(
    student_logits: jax.Array,
    candidate_ids: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_advantages: bool = False,
) -> tuple[jax.Array, Metrics]:
    """ADPA: minus the student's expected teacher advantage over candidate tokens.

    Per position ``t`` of a state sequence (the student's own generation), with candidates
    ``a`` (the DPO teacher's top-k tokens) and advantages
    ``A(s_t, a) = log pi_dpo(a | s_t) - log pi_ref(a | s_t)`` (precomputed):

        ``L_t = -sum_a p_S(a | s_t) * A(s_t, a)``  (paper, Eq. 11; ``p_S`` the full softmax)

    Loss = mean of ``L_t`` over valid positions. ``clip_advantages=True`` reproduces the
    released code, which clamps the advantages like probabilities to [1e-8, 1 - 1e-8]
    (negative advantages become 1e-8) and adds a residual bin with target 1e-8 weighted by the
    student's remaining mass ``1 - sum_a p_S(a)``. Shapes: logits ``[..., L, V]``, ids and
    advantages ``[..., L, K]``, mask ``[..., L]``, label-aligned. Metric:
    ``adpa/expected_advantage`` (= -loss).
    """
    _check_positions("adpa", student_logits, mask, candidate_ids=candidate_ids, advantages=advantages)
    loss = _adpa(_gathered_logps(student_logits, candidate_ids), advantages, mask, clip_advantages)
    return loss, {"adpa/expected_advantage": jax.lax.stop_gradient(-loss)}


def sft_adpa(
    chosen_logits: jax.Array,
    chosen_labels: jax.Array,
    chosen_mask: jax.Array,
    state_logits: jax.Array,
    candidate_ids: jax.Array,
    advantages: jax.Array,
    state_mask: jax.Array,
    *,
    sft_weight: float = 1.0,
    adpa_weight: float = 1.6,
    clip_advantages: bool = False,
) -> tuple[jax.Array, Metrics]:
    """The ADPA training objective: ``sft_weight * NLL(y_w) + adpa_weight * L_ADPA(states)``.

    ``NLL(y_w)`` is the token-mean NLL of the dataset's chosen response (``chosen_labels`` over
    ``chosen_mask``, label-aligned); ``L_ADPA`` is ``adpa`` on the student-generated state
    sequences. Defaults are the released recipe's (``student_adpa.yaml``): 1.0 and 1.6.
    Metrics: ``sft_adpa/sft``, ``sft_adpa/adpa`` and ``adpa/expected_advantage``.
    """
    labels = _label_logps("sft_adpa", chosen_logits, chosen_labels, chosen_mask)
    _check_positions("sft_adpa", state_logits, state_mask, candidate_ids=candidate_ids, advantages=advantages)
    return sft_adpa_from_logps(labels, chosen_mask, _gathered_logps(state_logits, candidate_ids), advantages,
                               state_mask, sft_weight=sft_weight, adpa_weight=adpa_weight,
                               clip_advantages=clip_advantages)


def sft_adpa_from_logps(
    chosen_label_logps: jax.Array,
    chosen_mask: jax.Array,
    state_student_logps: jax.Array,
    advantages: jax.Array,
    state_mask: jax.Array,
    *,
    sft_weight: float = 1.0,
    adpa_weight: float = 1.6,
    clip_advantages: bool = False,
) -> tuple[jax.Array, Metrics]:
    """``sft_adpa`` on gathered student log-probs: ``chosen_label_logps [..., L]`` of the chosen
    tokens, ``state_student_logps [..., L, K]`` = ``log_softmax(student logits)`` at the
    candidate ids (the clipped form's residual is ``1 - sum exp``). Same loss and metrics."""
    _check_gathered("sft_adpa_from_logps", chosen_mask, {"chosen_label_logps": chosen_label_logps}, {})
    _check_gathered("sft_adpa_from_logps", state_mask, {},
                    {"state_student_logps": state_student_logps, "advantages": advantages})
    nll = sft(chosen_label_logps, chosen_mask)[0]
    adpa_loss = _adpa(state_student_logps, advantages, state_mask, clip_advantages)
    metrics = {"adpa/expected_advantage": -adpa_loss, "sft_adpa/sft": nll, "sft_adpa/adpa": adpa_loss}
    return sft_weight * nll + adpa_weight * adpa_loss, jax.tree.map(jax.lax.stop_gradient, metrics)
