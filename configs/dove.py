"""DOVE / JPO (Bansal et al. 2024): DPO on joint prompt + response log-probs.

Pairs may compare responses to different prompts (``{"prompt_chosen", "chosen",
"prompt_rejected", "rejected"}`` or the DOVE release's ``i_chosen``/``r_chosen``/``i_reject``/
``r_reject``); the data pipeline scores every token but the first of each sequence (joint
masks). With equal prompts it is exactly DPO. The release's recipe: beta 0.1, cosine,
100 warmup steps, 32 pairs per step.

    python -m jaxalign.train --config configs/dove.py \
        --config.model.path=PATH/TO/HF_MODEL --config.data.train=PATH/TO/joint_pairs.jsonl
"""

from jaxalign.train.config import preference_recipe


def get_config():
    c = preference_recipe("dove")
    c.data.batch_size = 32
    c.data.micro_batch_size = 8
    return c
