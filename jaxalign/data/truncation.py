"""Truncation to ``max_length`` / ``max_prompt_length``; never an empty completion.

Prompts are cut from the left (the end of the prompt, next to the completion, is kept; a BOS
stays at position 0), completions from the right (a cut completion loses its EOS: it did not
end there). Lengths count every token, BOS and EOS included. Modes:

* ``keep_start``: cut the prompt to ``max_prompt_length``, then the completion to
  ``max_length - prompt_len``.
* ``keep_end``: cut the prompt to ``max_prompt_length``, then cut it further (down to BOS + 1
  token) so that the completion fits, and only then cut the completion.

A pair with one shared prompt keeps the same prompt tokens on both sides (``keep_end`` sizes
the cut by the longer completion). An example left with no completion token is dropped:
``truncate_*`` returns ``None`` and the caller counts it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from jaxalign.data.encoding import EncodedExample, EncodedPair, EncodedSequence

__all__ = ["TRUNCATION_MODES", "check_limits", "truncate", "truncate_example", "truncate_pair", "truncate_sequence"]

TruncationMode = Literal["keep_start", "keep_end"]
TRUNCATION_MODES = ("keep_start", "keep_end")


# The length limits the trainer (data.max_length, data.max_prompt_length) and
# ``python -m jaxalign.data.check`` default to.
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_PROMPT_LENGTH = 256


def check_limits(max_length: int, max_prompt_length: int | None, mode: str) -> None:
    """Raises ``ValueError`` for limits that could never keep a completion token."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation mode {mode!r} is not one of {', '.join(TRUNCATION_MODES)}")
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (BOS, a prompt token, a completion token), got {max_length}")
    if max_prompt_length is not None and not 2 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must lie in [2, max_length) = [2, {max_length}), got {max_prompt_length}"
        )


def _min_prompt(seq: EncodedSequence) -> int:
    return min(seq.prompt_len, 2 if seq.has_bos else 1)


def _prompt_keep(seq: EncodedSequence, max_prompt_length: int | None) -> int:
    return seq.prompt_len if max_prompt_length is None else min(seq.prompt_len, max_prompt_length)


def truncate_sequence(
    seq: EncodedSequence, *, max_length: int, prompt_keep: int
) -> EncodedSequence | None:
    """Keeps ``prompt_keep`` prompt tokens (from the right, BOS kept) and as much completion as fits."""
    prompt = seq.ids[: seq.prompt_len]
    if prompt_keep < seq.prompt_len:
        cut = seq.prompt_len - prompt_keep
        prompt = np.concatenate([prompt[:1], prompt[1 + cut:]]) if seq.has_bos else prompt[cut:]
    completion = seq.ids[seq.prompt_len:][: max(0, max_length - len(prompt))]
    if completion.shape[0] == 0:
        return None
    if len(prompt) == seq.prompt_len and len(completion) == seq.completion_len:
        return seq
    return replace(seq, ids=np.concatenate([prompt, completion]), prompt_len=len(prompt))


def _keep_for(seqs: tuple[EncodedSequence, ...], *, max_length: int, max_prompt_length: int | None, mode: str) -> int:
    """Prompt tokens to keep for sequences sharing one prompt."""
    first = seqs[0]
    keep = _prompt_keep(first, max_prompt_length)
    if mode == "keep_end":
        longest = max(s.completion_len for s in seqs)
        keep = max(_min_prompt(first), min(keep, max_length - longest))
    return keep


def _truncate_shared(
    seqs: tuple[EncodedSequence, ...], *, max_length: int, max_prompt_length: int | None, mode: str
) -> tuple[EncodedSequence, ...] | None:
    keep = _keep_for(seqs, max_length=max_length, max_prompt_length=max_prompt_length, mode=mode)
    out = tuple(truncate_sequence(s, max_length=max_length, prompt_keep=keep) for s in seqs)
    return None if any(s is None for s in out) else out


def truncate_pair(
    pair: EncodedPair, *, max_length: int, max_prompt_length: int | None = None, mode: TruncationMode = "keep_start"
) -> EncodedPair | None:
    """The truncated pair, or ``None`` when either side would keep no completion token."""
    c, r = pair.chosen, pair.rejected
    shared = c.prompt_len == r.prompt_len and np.array_equal(c.ids[: c.prompt_len], r.ids[: r.prompt_len])
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, mode=mode)
    if shared:
        out = _truncate_shared((c, r), **kw)
    else:  # DOVE: each side has its own prompt
        sides = (_truncate_shared((c,), **kw), _truncate_shared((r,), **kw))
        out = None if None in sides else (sides[0][0], sides[1][0])
    if out is None:
        return None
    if out[0] is c and out[1] is r:
        return pair
    return replace(pair, chosen=out[0], rejected=out[1])


def truncate_example(
    example: EncodedExample, *, max_length: int, max_prompt_length: int | None = None, mode: TruncationMode = "keep_start"
) -> EncodedExample | None:
    out = _truncate_shared((example.sequence,), max_length=max_length, max_prompt_length=max_prompt_length, mode=mode)
    return None if out is None else replace(example, sequence=out[0])


def truncate(
    example: EncodedPair | EncodedExample, *, max_length: int, max_prompt_length: int | None = None,
    mode: TruncationMode = "keep_start",
) -> EncodedPair | EncodedExample | None:
    """``truncate_pair`` or ``truncate_example``, by the example's kind."""
    cut = truncate_pair if isinstance(example, EncodedPair) else truncate_example
    return cut(example, max_length=max_length, max_prompt_length=max_prompt_length, mode=mode)
