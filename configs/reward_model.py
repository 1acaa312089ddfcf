"""Reward model: Bradley-Terry loss on a scalar head over the decoder's last-token hidden state.

Per pair ``-log sigma(r(x, y_w) - r(x, y_l) - margin)``; ``r`` is ``h_last . w`` (no bias) with
``h_last`` the final hidden state at the sequence's last token. The decoder and the head train
together; the export is an HF ``*ForSequenceClassification`` checkpoint with ``num_labels=1``
(``transformers.AutoModelForSequenceClassification`` and ``jaxalign.scoring.reward_model.RewardModel``
load it).

    python -m jaxalign.train --config configs/reward_model.py \
        --config.model.path=PATH/TO/HF_MODEL --config.data.train=PATH/TO/pairs.jsonl
"""

from jaxalign.train.config import base_config


def get_config():
    c = base_config()
    c.steps = 1000
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 500
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.buckets = (256, 512, 1024)
    c.data.batch_size = 64
    c.data.micro_batch_size = 8
    c.loss.name = "bradley_terry"
    c.loss.reward_margin = 0.0
    c.reference.mode = "none"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
    c.checkpoint.keep_best = "eval/rewards/accuracies"
    c.checkpoint.best_mode = "max"
    return c
