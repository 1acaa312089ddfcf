"""IPO (Azar et al. 2024): ``(h - 1 / (2 beta))^2`` with TRL's length-normalised log-ratios.

``--config.loss.ipo_normalize=False`` uses summed log-ratios (the original DPO repository's
form). Command line as in configs/dpo.py.
"""

from jaxalign.train.config import preference_recipe


def get_config():
    c = preference_recipe("ipo")
    c.loss.ipo_normalize = True
    return c
