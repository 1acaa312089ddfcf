"""The online benchmark's reward: one deterministic rule on the completion text, for both trainers.

TRL's ``OnlineDPOTrainer`` calls ``plain_text_reward`` as a reward function (with
``completion_ids`` and ``trainer_state`` among the keyword arguments); jaxalign loads it from
this file (``online.reward_function=<this file>:plain_text_reward``). Standard library only,
so the file loads on its own.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TARGET_CHARS", "plain_text_reward"]

TARGET_CHARS = 80  # the completion length (characters) the rule prefers


def plain_text_reward(prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
    """Per completion: the share of its characters that are ASCII letters or spaces, minus
    ``|characters - TARGET_CHARS| / TARGET_CHARS``. Two different texts rarely tie."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    scores = []
    for text in completions:
        plain = sum(c.isascii() and (c.isalpha() or c == " ") for c in text)
        scores.append(plain / max(len(text), 1) - abs(len(text) - TARGET_CHARS) / TARGET_CHARS)
    return scores
