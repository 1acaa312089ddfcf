"""Hinge loss of SLiC / RSO: ``max(0, 1 - beta h)`` (1 / beta is the target margin).

Command line as in configs/dpo.py.
"""

from jaxalign.train.config import preference_recipe


def get_config():
    return preference_recipe("hinge")
