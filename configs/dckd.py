"""DCKD (Gao et al., ICLR 2025; docs/distillation.md): distil a DPO-aligned teacher into a student.

``L = sft_weight * NLL(y_w) + chosen_kl_weight * KL_topk(teacher || student on y_w)
+ rejected_kl_weight * KL_topk(teacher || student on y_l)``: the teacher's top-50 next-token
distribution (plus a residual bin) on every completion token of both responses, precomputed once
and cached before training. The released recipe's settings (student_dckd.yaml): weights 1, 0.1,
0.1, AdamW 5e-7 cosine with 10% warmup, 32 pairs per step, one epoch.

    python -m jaxalign.train --config configs/dckd.py --config.model.path=STUDENT \
        --config.distill.teacher=DPO_TEACHER --config.data.train=pairs.jsonl
"""

from jaxalign.train.config import distill_recipe


def get_config():
    return distill_recipe("dckd")
