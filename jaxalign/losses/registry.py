"""Loss registry: configs name a loss by string, ``get(name)`` returns the function."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from jaxalign.losses.distill import adpa, dckd, sft_adpa, topk_kl
from jaxalign.losses.dove import dove
from jaxalign.losses.preference import cdpo, dpo, hinge, ipo, rdpo
from jaxalign.losses.reward import bradley_terry
from jaxalign.losses.sft import sft
from jaxalign.losses.vpo import vpo

LOSSES: MappingProxyType[str, Callable] = MappingProxyType(
    {
        "dpo": dpo,
        "cdpo": cdpo,
        "ipo": ipo,
        "hinge": hinge,
        "rdpo": rdpo,
        "vpo": vpo,
        "dove": dove,
        "topk_kl": topk_kl,
        "dckd": dckd,
        "adpa": adpa,
        "sft_adpa": sft_adpa,
        "sft": sft,
        "bradley_terry": bradley_terry,
    }
)


def names() -> list[str]:
    """The registered loss names, sorted."""
    return sorted(LOSSES)


def get(name: str) -> Callable:
    """The loss function registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}") from None
