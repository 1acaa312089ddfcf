"""Online quickstart: the whole RLHF workflow on 2 CPU cores, no downloads (docs/online.md).

    python -m jaxalign.train --config configs/online_quickstart.py --workdir runs/online_quickstart

1. writes a tiny random Llama-style model and the synthetic task (friendly vs dismissive
   answers, jaxalign/data/synthetic.py);
2. SFT on completions of mixed quality (each prompt with both answers), so the policy says both;
3. a Bradley-Terry reward model on the task's preference pairs;
4. online DPO rounds scored by that reward model.

The held-out curve ``eval/reward_mean`` is scored by the task's rule
(``jaxalign.data.synthetic:synthetic_reward``), not by the learned reward model, and rises from
round 0 to the last round.
"""

from jaxalign.train.config import online_recipe


def get_config():
    c = online_recipe("dpo")
    c.seed = 0
    c.log_every = 5
    c.checkpoint_every = 50
    c.model.path = "runs/tiny-model-online"
    c.model.create_if_missing = True
    c.model.dtype = "float32"
    c.model.tiny.hidden_size = 64
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    c.model.tiny.intermediate_size = 128
    c.model.tiny.vocab_size = 1024
    c.data.train = "synthetic"
    c.data.synthetic_pairs = 512
    c.data.eval_pairs = 32  # held out of the bootstrap stages' records
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.buckets = (64,)
    c.data.batch_size = 16
    c.data.micro_batch_size = 16
    c.data.packing = False
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.online.rounds = 6
    c.online.prompts_per_round = 64
    c.online.samples_per_prompt = 4
    c.online.max_new_tokens = 24
    c.online.sample_batch_size = 64
    c.online.epochs = 2
    c.online.missing_eos_penalty = 0.5
    c.online.eval_prompts = 32
    c.online.eval_reward_function = "jaxalign.data.synthetic:synthetic_reward"
    c.online.bootstrap = "synthetic"
    c.online.bootstrap_sft_steps = 600
    c.online.bootstrap_reward_model_steps = 200
    c.online.bootstrap_learning_rate = 1e-3
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
