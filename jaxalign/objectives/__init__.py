"""Training objectives: a loss function, the batch keys it reads, and how it weights a batch.

``Objective`` (``base``) is the interface the train step drives; ``pairwise`` (DPO family,
VPO, DOVE), ``sft``, ``reward`` (Bradley-Terry) and ``distill`` (DCKD, ADPA) build the
trainer's, ``from_config`` the one a config's ``loss`` group names. A new objective is an
``Objective`` built anywhere: the trainer's builders take it as it is.
"""

from __future__ import annotations

from typing import Any

from jaxalign.objectives.base import STEP_KEYS, Objective, real_token_mask, unit_weight
from jaxalign.objectives.distill import adpa, dckd
from jaxalign.objectives.pairwise import PAIRWISE, pairwise
from jaxalign.objectives.reward import bradley_terry
from jaxalign.objectives.sft import sft

__all__ = ["PAIRWISE", "STEP_KEYS", "Objective", "adpa", "bradley_terry", "dckd", "from_config", "pairwise",
           "real_token_mask", "sft", "unit_weight"]

# loss.name -> the hyperparameters of its loss function, from the ``loss`` config group.
_HYPERPARAMETERS = {
    "dpo": lambda c: {"beta": c.beta, "label_smoothing": c.label_smoothing},
    "ipo": lambda c: {"beta": c.beta},
    "hinge": lambda c: {"beta": c.beta},
    "rdpo": lambda c: {"beta": c.beta, "epsilon": c.epsilon},
    "dove": lambda c: {"beta": c.beta},
    "vpo": lambda c: {"beta": c.beta, "alpha": c.vpo_alpha, "mode": c.vpo_mode},
}


def from_config(loss: Any, reference_mode: str, distill: Any = None) -> Objective:
    """The objective of the ``loss`` config group (``jaxalign.train.config``) and ``reference.mode``;
    ``dckd`` and ``adpa`` take their weights from the ``distill`` group."""
    if loss.name in PAIRWISE:
        options = {"ipo_normalize": loss.ipo_normalize, "calibration": loss.vpo_calibration}
        return pairwise(loss.name, _HYPERPARAMETERS[loss.name](loss), options=options,
                        uses_reference=reference_mode != "none")
    if loss.name == "sft":
        return sft()
    if loss.name == "bradley_terry":
        return bradley_terry(loss.reward_margin)
    if loss.name in ("dckd", "adpa") and distill is None:
        raise ValueError(f"loss.name {loss.name!r} needs the config's distill group: from_config(..., distill=)")
    if loss.name == "dckd":
        return dckd(distill.sft_weight, distill.chosen_kl_weight, distill.rejected_kl_weight)
    if loss.name == "adpa":
        return adpa(distill.sft_weight, distill.adpa_weight, distill.adpa_clip)
    raise ValueError(f"loss.name {loss.name!r} is not supported by the trainer")
