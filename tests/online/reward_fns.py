"""Reward functions of the online tests, named ``<this file>.py:<function>`` in configs (the
file form of ``online.reward_function``). Not a test module (no ``test_`` prefix)."""

from __future__ import annotations

import math

POISON_TOPIC = "bees"  # not a function (load_function must refuse it)


def by_ids(prompts, completions, *, completion_ids, stopped, prompt_index, tag, **_):
    """A reward that separates almost every two completions: a hash of the sampled ids. It also
    checks the documented call: one entry per completion in every column, ``tag`` = the row's
    metadata."""
    n = len(completions)
    assert len(prompts) == len(completion_ids) == len(stopped) == len(prompt_index) == len(tag) == n
    assert all(isinstance(t, int) for t in tag)
    return [(sum((i + 1) * t for i, t in enumerate(ids)) % 97) / 10.0 for ids in completion_ids]


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def raises(prompts, completions, *, tag, **_):
    """Fails on the prompts of the rows with an odd ``tag``."""
    for t in tag:
        if t % 2:
            raise ValueError(f"no reward for odd tag {t}")
    return [0.0] * len(completions)


def wrong_length(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)


def nan(prompts, completions, **_):
    return [math.nan] + [0.0] * (len(completions) - 1)


def none(prompts, completions, **_):
    return [0.0, None] + [0.0] * (len(completions) - 2)


def string(prompts, completions, **_):
    return ["good"] * len(completions)


def not_a_sequence(prompts, completions, **_):
    return 3.0
