"""Robust DPO (Chowdhury, Kini, Natarajan, ICML 2024): unbiased under a known label-flip rate.

Per pair ``[(1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)] / (1 - 2 eps)``;
set ``loss.epsilon`` to the data's flip rate (in [0, 0.5)). Negative loss values are expected
for large margins. Command line as in configs/dpo.py.
"""

from jaxalign.train.config import preference_recipe


def get_config():
    c = preference_recipe("rdpo")
    c.loss.epsilon = 0.1
    return c
