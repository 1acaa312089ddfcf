"""DPO (Rafailov et al. 2023): ``-log sigma(beta h)`` on the policy/reference log-ratio margin h.

    python -m jaxalign.train --config configs/dpo.py \
        --config.model.path=PATH/TO/HF_MODEL --config.data.train=PATH/TO/pairs.jsonl

beta 0.1, AdamW 1e-6 (TRL's defaults); the frozen reference runs inside the jitted step
(``--config.reference.mode=precomputed`` caches its log-probs on disk instead).
"""

from jaxalign.train.config import preference_recipe


def get_config():
    return preference_recipe("dpo")
