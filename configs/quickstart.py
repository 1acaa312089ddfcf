"""Quickstart: DPO on a tiny local model and a synthetic preference task (CPU, < 5 minutes).

    python -m jaxalign.train --config configs/quickstart.py --workdir runs/quickstart

Writes a tiny random Llama-style model with a small BPE tokenizer to runs/tiny-model (once),
generates the synthetic task (friendly vs dismissive answers, jaxalign/data/synthetic.py)
and trains DPO against a frozen copy of the initial model. The held-out preference accuracy
(eval/rewards/accuracies) starts at 0 (policy == reference) and climbs towards 1.
"""

from jaxalign.train.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.steps = 120
    c.log_every = 10
    c.eval_every = 10
    c.checkpoint_every = 60
    c.model.path = "runs/tiny-model"
    c.model.create_if_missing = True
    c.model.tiny.hidden_size = 64
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    c.model.tiny.intermediate_size = 128
    c.model.tiny.vocab_size = 1024
    c.data.train = "synthetic"
    c.data.synthetic_pairs = 576
    c.data.eval_pairs = 64
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.buckets = (64,)
    c.data.batch_size = 16
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.reference.mode = "frozen"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.schedule = "cosine"
    c.eval.batch_size = 32
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
