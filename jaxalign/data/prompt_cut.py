"""Where a prompt's text may be cut so that only its tail is tokenized again with each completion.

A pair's prompt ``P`` is tokenized once, and again inside ``P + C`` and ``P + R``: most of a
batched tokenization's work is the prompt, three times. For a cut ``k`` of ``P`` (below) and
``T = P[k:]``, with ``j = len(tok(P)) - len(tok(T))``::

    tok(P)     == tok(P)[:j] + tok(T)
    tok(P + X) == tok(P)[:j] + tok(T + X)      for every completion text X

so ``P``, ``T`` and ``T + X`` are tokenized instead of ``P`` and ``P + X``: about ``|P| + 2|T|``
characters less per completion.

**Why it holds.** ``k`` is a position with ``P[k - 1] == "\\n"`` and ``P[k]`` a printable
ASCII character other than space. For the tokenizers ``cuttable`` accepts (byte-level BPE, no
dropout; normalizer none or NFC; pre-tokenized by GPT-2's regex or the Qwen2 / Llama-3 one, no
prefix space; added tokens without whitespace and without ``lstrip``/``rstrip``/``single_word``):

* no pre-token of those regexes holds a newline followed by a non-space character, so every
  string holding ``P[:k + 1]`` has a pre-token boundary at ``k``; the matches before ``k`` look
  at characters up to ``P[k]`` at most (whitespace runs, and ``\\s+(?!\\S)``'s look-ahead), the
  same in ``P`` and ``P + X``; the regexes have no look-behind or anchors, so the matches from
  ``k`` on are those of ``P[k:]`` alone;
* BPE merges within a pre-token only; NFC neither composes nor reorders across a newline; an
  added token cannot span the newline;

so both ``P`` and ``P + X`` tokenize to the same tokens before ``k`` followed by the tokens of
their text from ``k``. ``Encoder.encode_many`` checks ``tok(P)`` ends with ``tok(T)`` and
tokenizes ``P + X`` whole otherwise; the tests compare against whole tokenization on real
tokenizers and on adversarial text.
"""

from __future__ import annotations

import json
from typing import Any

from jaxalign.tokenizers import QWEN2_5_PATTERN

__all__ = ["cuttable", "last_cut"]

# Pre-tokenization regexes with the property above: Qwen2/2.5 (single digits) and Llama-3 /
# GPT-4's cl100k (digits in threes). GPT-2's is ByteLevel's built-in one (``use_regex``).
SAFE_PATTERNS = frozenset({QWEN2_5_PATTERN, QWEN2_5_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")})
_CUT_AFTER = "\n"
_CUT_BEFORE = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII, not space


def _byte_level(pre: dict[str, Any], *, regex: bool) -> bool:
    return (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", False)
            and bool(pre.get("use_regex", True)) == regex)


def _safe_pre_tokenizer(pre: dict[str, Any] | None) -> bool:
    if pre is None:
        return False
    if _byte_level(pre, regex=True):
        return True
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2 or not _byte_level(steps[1], regex=False):
        return False
    split = steps[0]
    return (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
            and split.get("pattern", {}).get("Regex") in SAFE_PATTERNS)


def _state(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


def cuttable(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (a transformers fast tokenizer) tokenizes every text cut at a
    ``last_cut`` position as the two parts tokenized apart (module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return False
    normalizer = _state(backend.normalizer)
    added_ok = all(
        not any(ch.isspace() for ch in t.content) and not (t.lstrip or t.rstrip or t.single_word)
        for t in backend.get_added_tokens_decoder().values()
    )
    return (type(backend.model).__name__ == "BPE" and backend.model.dropout is None and added_ok
            and (normalizer is None or normalizer.get("type") == "NFC")
            and _safe_pre_tokenizer(_state(backend.pre_tokenizer)))


def last_cut(text: str) -> int:
    """The last ``k`` in ``[1, len(text))`` with ``text[k-1] == "\\n"`` and ``text[k]`` printable
    non-space ASCII; 0 if there is none."""
    k = text.rfind(_CUT_AFTER, 0, len(text) - 1)
    while k >= 0:
        if text[k + 1] in _CUT_BEFORE:
            return k + 1
        k = text.rfind(_CUT_AFTER, 0, k)
    return 0
