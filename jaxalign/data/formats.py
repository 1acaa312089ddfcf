"""Record formats: detection from a row's keys, parsing into normalised records.

Formats (``FORMATS``):

* ``standard``: ``{"prompt", "chosen", "rejected"}`` strings.
* ``conversational``: the same keys holding message lists; ``chosen``/``rejected`` start
  with an assistant message.
* ``implicit``: only ``chosen`` and ``rejected``, whole dialogues sharing a prefix. For strings
  (Anthropic HH-RLHF) the prompt is the longest common prefix cut back to end at the last
  assistant-turn marker (``"\\n\\nAssistant:"``) it contains; the completions are the rest.
  For message lists it is the longest common run of messages followed by an assistant message.
* ``dove``: joint pairs, each side with its own prompt: ``prompt_chosen``/``prompt_rejected``
  with ``chosen``/``rejected`` (or ``response_chosen``/``response_rejected``), or the DOVE
  release's ``i_chosen``, ``r_chosen``, ``i_reject``, ``r_reject``.
* ``sft``: ``{"prompt", "completion"}`` or ``{"messages"}`` (the last message, an assistant
  turn, is the completion: only the final assistant turn is trained).
* ``prompt``: ``{"prompt"}`` alone (prompt-only data for the online loop).

``KeyMap`` renames a dataset's own keys to ``prompt``/``chosen``/``rejected`` first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jaxalign.data.records import (
    FieldError,
    PreferenceRecord,
    PromptRecord,
    Record,
    SFTRecord,
    Text,
    validate_text,
)

__all__ = [
    "FORMATS",
    "HH_ASSISTANT_MARKER",
    "KeyMap",
    "detect_format",
    "parse_row",
    "split_implicit_messages",
    "split_implicit_text",
]

FORMATS = ("standard", "conversational", "implicit", "dove", "sft", "prompt")
PREFERENCE_FORMATS = ("standard", "conversational", "implicit", "dove")
HH_ASSISTANT_MARKER = "\n\nAssistant:"
_DOVE_RELEASE_KEYS = ("i_chosen", "r_chosen", "i_reject", "r_reject")


@dataclass(frozen=True)
class KeyMap:
    """Names of the prompt/chosen/rejected columns in the user's data."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    def apply(self, row: Mapping[str, Any]) -> dict[str, Any]:
        renames = {self.prompt: "prompt", self.chosen: "chosen", self.rejected: "rejected"}
        if all(k == v for k, v in renames.items()):
            return dict(row)
        out = {k: v for k, v in row.items() if k not in renames.values() or k in renames}
        for src, dst in renames.items():
            if src in row:
                out[dst] = row[src]
        return out


def detect_format(row: Mapping[str, Any]) -> str:
    """The format a row's keys (and value types) imply; raises ``FieldError`` if none fits."""
    keys = set(row)
    if set(_DOVE_RELEASE_KEYS) <= keys or {"prompt_chosen", "prompt_rejected"} <= keys:
        return "dove"
    # A row with half of a pair is a broken pair, not another format.
    for group in (_DOVE_RELEASE_KEYS, ("prompt_chosen", "prompt_rejected"), ("chosen", "rejected")):
        present = [k for k in group if k in keys]
        if present and len(present) < len(group):
            missing = next(k for k in group if k not in keys)
            raise FieldError(missing, f"missing (the row has {', '.join(repr(k) for k in present)})")
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys:
            return "implicit"
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    if "messages" in keys or {"prompt", "completion"} <= keys:
        return "sft"
    if "prompt" in keys:
        return "prompt"
    raise FieldError(
        "<row>", f"cannot detect the format from keys {sorted(keys)} (expected one of: {', '.join(FORMATS)})"
    )


def _get(row: Mapping[str, Any], *names: str) -> Any:
    """The value of the first key of ``names`` present in ``row``; ``FieldError`` if none is."""
    for name in names:
        if name in row:
            if row[name] is None:
                raise FieldError(name, "is null")
            return row[name]
    raise FieldError(names[0], "missing")


def _same_kind(prompt_field: str, prompt: Text, field: str, completion: Text) -> None:
    if isinstance(prompt, list) != isinstance(completion, list):
        want = "a message list" if isinstance(prompt, list) else "a string"
        raise FieldError(field, f"expected {want} like {prompt_field}, got {type(completion).__name__}")
    if isinstance(completion, list) and completion[0]["role"] != "assistant":
        raise FieldError(f"{field}[0].role", f"a completion must start with an assistant message, got {completion[0]['role']!r}")


def split_implicit_text(chosen: str, rejected: str, marker: str = HH_ASSISTANT_MARKER) -> tuple[str, str, str]:
    """``(prompt, chosen_completion, rejected_completion)`` of two dialogues sharing a prefix.

    The prompt is the longest common prefix of the two strings, cut back to end right after
    the last ``marker`` it contains (so it ends with the assistant-turn marker and each
    completion starts where the two replies diverge from that turn on).
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut < 0:
        raise FieldError("chosen", f"no shared prefix ending at the assistant-turn marker {marker!r}")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def split_implicit_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    """``(prompt, chosen_completion, rejected_completion)`` of two message lists.

    The prompt is the longest common run of leading messages that is followed, in both, by an
    assistant message.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not (
        n < len(chosen) and n < len(rejected)
        and chosen[n]["role"] == "assistant" and rejected[n]["role"] == "assistant"
    ):
        n -= 1
    if n == 0:
        raise FieldError("chosen", "no shared prefix of messages followed by an assistant message")
    return chosen[:n], chosen[n:], rejected[n:]


def _preference(fmt: str, row: Mapping[str, Any], marker: str) -> PreferenceRecord:
    if fmt == "implicit":
        chosen = validate_text("chosen", _get(row, "chosen"))
        rejected = validate_text("rejected", _get(row, "rejected"))
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise FieldError("rejected", "chosen and rejected must both be strings or both message lists")
        if chosen == rejected:
            raise FieldError("rejected", "identical to chosen")
        if isinstance(chosen, str):
            prompt, c, r = split_implicit_text(chosen, rejected, marker)
        else:
            prompt, c, r = split_implicit_messages(chosen, rejected)
        validate_text("prompt", prompt)
        c = validate_text("chosen", c)
        r = validate_text("rejected", r)
        return PreferenceRecord(prompt, c, r, format=fmt)
    if fmt == "dove":
        if all(k in row for k in _DOVE_RELEASE_KEYS):
            names = _DOVE_RELEASE_KEYS
        else:
            names = ("prompt_chosen", "response_chosen" if "response_chosen" in row else "chosen",
                     "prompt_rejected", "response_rejected" if "response_rejected" in row else "rejected")
        pc, c, pr, r = (validate_text(n, _get(row, n)) for n in names)
        _same_kind(names[0], pc, names[1], c)
        _same_kind(names[2], pr, names[3], r)
        if isinstance(pc, list) != isinstance(pr, list):
            raise FieldError(names[2], f"{names[0]} and {names[2]} must both be strings or both message lists")
        if (pc, c) == (pr, r):
            raise FieldError(names[3], f"identical pair: {names[2]}/{names[3]} equal {names[0]}/{names[1]}")
        return PreferenceRecord(pc, c, r, rejected_prompt=pr, format=fmt)
    prompt = validate_text("prompt", _get(row, "prompt"))
    chosen = validate_text("chosen", _get(row, "chosen"))
    rejected = validate_text("rejected", _get(row, "rejected"))
    want_list = fmt == "conversational"
    if isinstance(prompt, list) != want_list:
        raise FieldError("prompt", f"format {fmt!r} expects {'a message list' if want_list else 'a string'}")
    _same_kind("prompt", prompt, "chosen", chosen)
    _same_kind("prompt", prompt, "rejected", rejected)
    if chosen == rejected:
        raise FieldError("rejected", "identical to chosen")
    return PreferenceRecord(prompt, chosen, rejected, format=fmt)


def _sft(row: Mapping[str, Any]) -> SFTRecord:
    if "messages" in row:
        messages = validate_text("messages", _get(row, "messages"))
        if not isinstance(messages, list):
            raise FieldError("messages", "expected a list of messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise FieldError("messages", "must hold at least one message before a final assistant message")
        completion = validate_text(f"messages[{len(messages) - 1}].content", messages[-1:])
        return SFTRecord(validate_text("messages", messages[:-1]), completion)
    prompt = validate_text("prompt", _get(row, "prompt"))
    completion = validate_text("completion", _get(row, "completion"))
    _same_kind("prompt", prompt, "completion", completion)
    return SFTRecord(prompt, completion)


def parse_row(
    row: Any,
    *,
    format: str = "auto",
    keys: KeyMap = KeyMap(),
    marker: str = HH_ASSISTANT_MARKER,
) -> Record:
    """Validates one raw row and returns its normalised record (``index``, ``file``, ``line`` unset).

    ``format="auto"`` detects the format per row. Raises ``FieldError`` naming the field.
    """
    if not isinstance(row, Mapping):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    row = keys.apply(row)
    fmt = detect_format(row) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    if fmt in PREFERENCE_FORMATS:
        return _preference(fmt, row, marker)
    if fmt == "sft":
        return _sft(row)
    return PromptRecord(validate_text("prompt", _get(row, "prompt")))
