"""Supervised fine-tuning (warm start before preference training): token-mean NLL.

Data: ``{"prompt", "completion"}`` or ``{"messages": [...]}`` records; only the completion
(final assistant turn) is trained. Preference data (any pairwise format, e.g. HH-RLHF) works
too: SFT then trains on the chosen responses, the usual step before DPO. No reference model.

    python -m jaxalign.train --config configs/sft.py \
        --config.model.path=PATH/TO/HF_MODEL --config.data.train=PATH/TO/sft.jsonl
"""

from jaxalign.train.config import base_config


def get_config():
    c = base_config()
    c.steps = 2000
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 500
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.buckets = (256, 512, 1024)
    c.data.batch_size = 64
    c.data.micro_batch_size = 16
    c.data.packing = True
    c.loss.name = "sft"
    c.reference.mode = "none"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.01
    c.checkpoint.keep_best = "eval/loss"
    return c
