"""cDPO (conservative DPO, E. Mitchell's note): DPO assuming labels flip with rate 0.1.

Per pair ``(1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h)``, minimal at the finite
margin ``beta h = log((1 - eps) / eps)``. Command line as in configs/dpo.py.
"""

from jaxalign.train.config import preference_recipe


def get_config():
    c = preference_recipe("dpo")
    c.loss.label_smoothing = 0.1
    return c
