"""ADPA (Gao et al., ICLR 2025; docs/distillation.md): advantage-guided distillation.

The states are the student's own greedy generations on the training prompts; at each state
token the DPO teacher's top-50 candidates ``a`` get the advantage
``A(s, a) = log pi_dpo(a|s) - log pi_ref(a|s)`` against the teacher's reference (its SFT
checkpoint); ``L = sft_weight * NLL(y_w) - adpa_weight * mean_t sum_a p_student(a|s_t) A(s_t, a)``
(the paper's form; ``--config.distill.adpa_clip=True`` for the released code's clamping). The
released recipe (student_adpa.yaml): adpa_weight 1.6, from the DCKD student.

    python -m jaxalign.train --config configs/adpa.py --config.model.path=STUDENT \
        --config.distill.teacher=DPO_TEACHER --config.distill.teacher_reference=SFT_TEACHER \
        --config.data.train=pairs.jsonl
"""

from jaxalign.train.config import distill_recipe


def get_config():
    return distill_recipe("adpa")
