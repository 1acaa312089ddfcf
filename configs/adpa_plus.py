"""ADPA+ (Gao et al., ICLR 2025; docs/distillation.md): DCKD, then ADPA from the DCKD student.

Two stages, each resumable in its own directory (``WORKDIR/stages/dckd``, ``WORKDIR/stages/adpa``),
with the released recipes' settings (configs/dckd.py, configs/adpa.py); ADPA's states are the DCKD
student's own greedy generations.

    python -m jaxalign.train --config configs/adpa_plus.py --config.model.path=STUDENT \
        --config.distill.teacher=DPO_TEACHER --config.distill.teacher_reference=SFT_TEACHER \
        --config.data.train=pairs.jsonl
"""

from jaxalign.train.config import distill_recipe


def get_config():
    c = distill_recipe("adpa")
    c.distill.pipeline = "adpa_plus"
    return c
