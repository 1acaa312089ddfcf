"""Online VPO (Cen et al., ICLR 2025; docs/online.md §2): online DPO plus the optimistic value term.

``L = L_DPO + alpha * beta * mean(log pi(y_cal) - log pi_ref(y_cal))`` with one calibration
response ``y_cal`` per prompt sampled from the (fixed) reference policy, once per prompt and
reused across rounds; the term is logged as ``vpo/regularizer``. Command line as in
configs/online_dpo.py.
"""

from jaxalign.train.config import online_recipe


def get_config():
    c = online_recipe("vpo")
    c.loss.vpo_mode = "online"
    c.loss.vpo_calibration = "reference_samples"
    c.loss.vpo_alpha = 0.1
    return c
