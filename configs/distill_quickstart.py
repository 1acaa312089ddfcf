"""Distillation quickstart: preference alignment distilled from a teacher into a smaller student,
on 2 CPU cores, no downloads (docs/distillation.md).

    python -m jaxalign.train --config configs/distill_quickstart.py --workdir runs/distill_quickstart

On the synthetic task (friendly vs dismissive answers): a teacher (a tiny model, hidden 128) is
SFT-trained on completions of mixed quality (its reference), then DPO-trained (the aligned
teacher); a smaller student (hidden 64) is SFT-trained on the same mixed completions, then
distilled with DCKD, then ADPA (jaxalign/distill/pipeline.py: QUICKSTART has the stages' steps).
metrics.jsonl gets ``eval/reward_mean``, the task rule's mean over the greedy completions of 32
held-out prompts, for each model (``stage`` 0-4: teacher reference, teacher, SFT student, DCKD
student, ADPA student).
"""

from jaxalign.train.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.log_every = 10
    c.model.path = "runs/tiny-student"
    c.model.create_if_missing = True
    c.model.tiny.hidden_size = 64
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    c.model.tiny.intermediate_size = 128
    c.model.tiny.vocab_size = 1024
    c.data.train = "synthetic"
    c.data.synthetic_pairs = 512
    c.data.eval_pairs = 32
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.buckets = (64,)
    c.data.batch_size = 16
    c.eval.batch_size = 32
    c.distill.top_k = 5  # candidates of a 1,024-token vocabulary (the paper: 50 of 128k)
    c.distill.max_new_tokens = 24
    c.distill.pipeline = "quickstart"
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
