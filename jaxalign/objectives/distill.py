"""Distillation objectives (DCKD, ADPA): the batch keys they will read.

Interface only: the losses exist (``jaxalign.losses.dckd``, ``adpa``), the teacher top-k
precompute that feeds them does not yet. Their objectives will read per-token side arrays
(docs/architecture.md), label-aligned with ``input_ids``: DCKD the teacher's top-k ids and
probabilities ``[R, L, K]``; ADPA the candidate ids and advantages ``[R, L, K]``. A
distillation objective is an ``Objective`` with these ``batch_keys`` whose ``loss_fn`` takes
the student's log-probs of the candidates from ``forward.hidden_states`` and the unembedding.
"""

from __future__ import annotations

__all__ = ["ADPA_KEYS", "DCKD_KEYS"]

DCKD_KEYS = ("teacher_topk_ids", "teacher_topk_probs")
ADPA_KEYS = ("candidate_ids", "advantages")
