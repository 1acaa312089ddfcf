"""VPO, offline (Cen et al., ICLR 2025): DPO plus the pessimistic value regulariser.

``L = L_DPO - alpha * beta * mean(log pi(y_cal) - log pi_ref(y_cal))`` with the calibration
responses ``y_cal`` = the data's chosen responses (``loss.vpo_calibration = "chosen"``), which
pulls the policy towards them (pessimism). ``--config.loss.vpo_mode=online`` flips the sign.
Command line as in configs/dpo.py.
"""

from jaxalign.train.config import preference_recipe


def get_config():
    c = preference_recipe("vpo")
    c.loss.vpo_mode = "offline"
    c.loss.vpo_alpha = 0.1
    c.loss.vpo_calibration = "chosen"
    return c
