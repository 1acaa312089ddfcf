"""Preference pairs from K scored completions per prompt.

Rules (``online.pair_rule``), for one prompt's rewards ``r [K]``:

* ``best_worst`` (default; RLHFlow's ``max_min``): chosen = the first argmax, rejected = the
  first argmin;
* ``random``: two distinct completions drawn with ``default_rng([seed, round, position])``,
  the higher-rewarded one chosen;
* ``all_pairs``: every two completions ``i < j``, the higher-rewarded one chosen.

A candidate pair whose rewards differ by ``tie_margin`` or less is a tie: dropped and counted
(with a binary correct/incorrect reward, ``best_worst`` gives a correct-vs-incorrect pair
whenever the K hold both).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

__all__ = ["PAIR_RULES", "Pairing", "make_pairs"]

PAIR_RULES = ("best_worst", "random", "all_pairs")


@dataclasses.dataclass(frozen=True)
class Pairing:
    """``pairs``: ``(prompt row, chosen sample, rejected sample)`` triples (row = the prompt's
    row in the round); ``ties``: candidate pairs dropped as ties."""

    pairs: list[tuple[int, int, int]]
    ties: int


def _candidates(rule: str, rewards: np.ndarray, rng: np.random.Generator | None) -> list[tuple[int, int]]:
    k = len(rewards)
    if rule == "best_worst":
        return [(int(np.argmax(rewards)), int(np.argmin(rewards)))]
    if rule == "random":
        i, j = rng.choice(k, size=2, replace=False)
        return [(int(i), int(j))]
    return list(itertools.combinations(range(k), 2))


def make_pairs(rewards: np.ndarray, *, rule: str, tie_margin: float, seed: int, round_index: int,
               positions: np.ndarray) -> Pairing:
    """The pairs of a round's rewards ``[M, K]`` (row ``m`` = the prompt at stream position
    ``positions[m]``) under ``rule`` (see the module docstring)."""
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {', '.join(PAIR_RULES)}, got {rule!r}")
    pairs, ties = [], 0
    for m, row in enumerate(np.asarray(rewards, np.float64)):
        rng = np.random.default_rng([seed, round_index, int(positions[m])]) if rule == "random" else None
        for i, j in _candidates(rule, row, rng):
            if abs(row[i] - row[j]) <= tie_margin:
                ties += 1
                continue
            chosen, rejected = (i, j) if row[i] > row[j] else (j, i)
            pairs.append((m, chosen, rejected))
    return Pairing(pairs, ties)
