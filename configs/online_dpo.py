"""Online iterative DPO (RLHFlow's recipe, docs/online.md): rounds of sample -> score -> pair -> train.

Each round samples ``online.samples_per_prompt`` completions of ``online.prompts_per_round``
prompts from the current policy, scores them with your reward function and/or reward model,
pairs the best with the worst of each prompt (ties dropped) and trains DPO on the pairs
against the initial policy (the paper's fixed reference); settings in
``jaxalign.train.config.online_recipe``.

    python -m jaxalign.train --config configs/online_dpo.py --config.model.path=M \
        --config.data.train=prompts.jsonl --config.online.reward_function=my_rewards:score \
        --config.online.rounds=3 --config.online.prompts_per_round=64 --config.online.samples_per_prompt=4

(``--config.online.reward_model=PATH`` scores with a reward model: a ``configs/reward_model.py``
run directory or its export.)
"""

from jaxalign.train.config import online_recipe


def get_config():
    return online_recipe("dpo")
