"""Tokenization of records: chat templates, the prompt/completion boundary, BOS and EOS.

For one (prompt, completion) the encoder produces ``ids = prompt_ids + completion_ids`` and
``prompt_len = len(prompt_ids)``, with these guarantees:

* **Template.** Message lists are rendered with the tokenizer's chat template: the prompt
  with ``add_generation_prompt=True``, prompt + completion without. The prompt's rendering
  must be a string prefix of the full rendering (templates that re-render earlier turns are
  rejected: the mask would be wrong); the completion text is the rest.
* **Boundary.** ``prompt_ids = tok(prompt_text)`` exactly (what the model is given at
  generation time). If ``tok(prompt_text)`` is a token prefix of ``tok(prompt_text +
  completion_text)`` the completion ids are the remaining tokens. Otherwise a BPE merge
  crosses the boundary; with ``on_boundary_merge="split"`` (default) the completion is
  tokenized on its own (``prompt_ids + tok(completion_text)``, counted in
  ``boundary_merges``), with ``"error"`` the record is rejected.
* **BOS.** Exactly one BOS at position 0 when the tokenizer adds one (detected from
  ``tok("a")``, or forced by ``add_bos``) or when the template renders one; never one
  elsewhere added by us; none for tokenizers without BOS (Qwen).
* **EOS.** Each completion ends with exactly one end-of-turn token (``eos_token``, default the
  tokenizer's EOS): if the completion already holds it and only whitespace follows (chat
  templates append ``"\\n"`` after ``<|im_end|>``), the trailing whitespace tokens are
  dropped; otherwise it is appended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from jaxalign.data.prompt_cut import cuttable, last_cut
from jaxalign.data.records import (
    FieldError,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    Text,
)

__all__ = ["EncodedPair", "EncodedSequence", "Encoder", "EncodedExample", "batch_ids"]

BoundaryPolicy = Literal["split", "error"]
Rendered = tuple[str, str, str]  # (prompt_text, completion_text, field)


def batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]`` of every text, in one batch call.

    A fast tokenizer without truncation, padding or special-token splitting set is called
    directly (``encode_batch_fast``: the same ids without the wrapper's per-call overhead);
    any other goes through ``tokenizer(texts)``.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and not getattr(tokenizer, "split_special_tokens", False)):
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class EncodedSequence:
    """Token ids ``[n]`` int32; ``ids[:prompt_len]`` is the prompt (with BOS), the rest the completion.

    ``side``: per-token arrays label-aligned with ``ids`` (``side[k][t]`` belongs to token ``t``),
    each ``[n]`` or ``[n, K]`` of any dtype (e.g. a teacher's top-k ids and probs); batching
    carries them to the rows and columns where the tokens land.
    """

    ids: np.ndarray
    prompt_len: int
    has_bos: bool
    side: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for key, value in self.side.items():
            if value.ndim not in (1, 2) or value.shape[0] != len(self):
                raise ValueError(
                    f"side array {key!r} has shape {value.shape}; it must be [{len(self)}] or "
                    f"[{len(self)}, K], label-aligned with ids of shape {self.ids.shape}"
                )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def completion_len(self) -> int:
        return len(self) - self.prompt_len


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized preference pair; ``index`` is the record's ``example_index``."""

    chosen: EncodedSequence
    rejected: EncodedSequence
    index: int

    @property
    def sequences(self) -> tuple[EncodedSequence, EncodedSequence]:
        return (self.chosen, self.rejected)


@dataclass(frozen=True)
class EncodedExample:
    """A tokenized SFT example (one sequence)."""

    sequence: EncodedSequence
    index: int

    @property
    def sequences(self) -> tuple[EncodedSequence]:
        return (self.sequence,)


class Encoder:
    """Turns records into ``EncodedSequence``s with one tokenizer (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        add_bos: bool | None = None,
        eos_token: str | None = None,
        on_boundary_merge: BoundaryPolicy = "split",
    ):
        if on_boundary_merge not in ("split", "error"):
            raise ValueError(f"on_boundary_merge must be 'split' or 'error', got {on_boundary_merge!r}")
        self.tokenizer = tokenizer
        self.bos_id: int | None = tokenizer.bos_token_id
        if add_bos is None:
            probe = tokenizer("a")["input_ids"]
            add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token")
        self.add_bos = add_bos
        eos_token = eos_token if eos_token is not None else tokenizer.eos_token
        if eos_token is None:
            raise ValueError("the tokenizer has no eos_token; pass eos_token= (the end-of-turn token)")
        self.eos_id: int = tokenizer.convert_tokens_to_ids(eos_token)
        if self.eos_id is None or self.eos_id == tokenizer.unk_token_id:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        self.on_boundary_merge = on_boundary_merge
        self.boundary_merges = 0
        self._recent: dict[str, list[int]] = {}  # chosen and rejected share their prompt text

    def _ids(self, text: str) -> list[int]:
        if text not in self._recent:
            if len(self._recent) >= 4:
                self._recent.clear()
            self._recent[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self._recent[text])

    def _render(self, prompt: Text, completion: Text | None, field: str) -> tuple[str, str]:
        """``(prompt_text, completion_text)``; message lists go through the chat template."""
        if isinstance(prompt, str):
            if completion is not None and not isinstance(completion, str):
                raise FieldError(field, "a message-list completion needs a message-list prompt")
            return prompt, completion or ""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise FieldError(field, "conversational record but the tokenizer has no chat template")
        prompt_text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if completion is None:
            return prompt_text, ""
        full_text = self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise FieldError(
                field,
                "the chat template is not prefix-preserving: rendering prompt + completion changes "
                "the prompt's text, so the completion cannot be located (use a training template)",
            )
        return prompt_text, full_text[len(prompt_text):]

    def _with_bos(self, prompt_ids: list[int]) -> tuple[list[int], bool]:
        lead = self.bos_id is not None and prompt_ids[:1] == [self.bos_id]
        while self.bos_id is not None and prompt_ids[:1] == [self.bos_id]:
            prompt_ids = prompt_ids[1:]
        if self.add_bos or lead:
            return [self.bos_id] + prompt_ids, True
        return prompt_ids, False

    def _end_with_eos(self, completion_ids: list[int]) -> list[int]:
        if self.eos_id in completion_ids:
            last = len(completion_ids) - 1 - completion_ids[::-1].index(self.eos_id)
            tail = completion_ids[last + 1:]
            if not self.tokenizer.decode(tail).strip():
                return completion_ids[: last + 1]
        return completion_ids + [self.eos_id]

    def encode_sequence(self, prompt: Text, completion: Text, field: str = "chosen") -> EncodedSequence:
        """Encodes one prompt + completion; ``field`` names the completion in errors."""
        return self._sequence(*self._render(prompt, completion, field), field)

    def _sequence(self, prompt_text: str, completion_text: str, field: str) -> EncodedSequence:
        """The sequence of rendered texts, tokenized one text at a time."""
        return self._assemble(self._ids(prompt_text), self._ids(prompt_text + completion_text), completion_text, field)

    def _assemble(self, prompt_ids: list[int], full_ids: list[int], completion_text: str,
                  field: str) -> EncodedSequence:
        """The sequence of ``tok(prompt_text)`` and ``tok(prompt_text + completion_text)``."""
        if full_ids[: len(prompt_ids)] == prompt_ids:
            completion_ids = full_ids[len(prompt_ids):]
        elif self.on_boundary_merge == "error":
            raise FieldError(
                field,
                "a token merges across the prompt/completion boundary (the prompt's tokens are not a "
                "prefix of the prompt + completion tokens); on_boundary_merge='split' tokenizes them apart",
            )
        else:
            self.boundary_merges += 1
            completion_ids = self._ids(completion_text)
        prompt_ids, has_bos = self._with_bos(prompt_ids)
        completion_ids = self._end_with_eos(completion_ids)
        if not prompt_ids:
            raise FieldError("prompt", "encodes to no tokens")
        ids = np.asarray(prompt_ids + completion_ids, dtype=np.int32)
        return EncodedSequence(ids=ids, prompt_len=len(prompt_ids), has_bos=has_bos)

    def encode_pair(self, record: PreferenceRecord) -> EncodedPair:
        chosen = self.encode_sequence(record.prompt, record.chosen, "chosen")
        rejected = self.encode_sequence(record.rejected_side_prompt, record.rejected, "rejected")
        return EncodedPair(chosen, rejected, record.index)

    def encode_sft(self, record: SFTRecord) -> EncodedExample:
        return EncodedExample(self.encode_sequence(record.prompt, record.completion, "completion"), record.index)

    def encode(self, record: PreferenceRecord | SFTRecord | PromptRecord) -> EncodedPair | EncodedExample:
        """A training example: a pair from a preference record, an example from an SFT record;
        a prompt-only record has nothing to train on (``FieldError``)."""
        if isinstance(record, PreferenceRecord):
            return self.encode_pair(record)
        if isinstance(record, SFTRecord):
            return self.encode_sft(record)
        raise FieldError("prompt", "a prompt-only record has no completion to train on")

    def _rendered(self, record: PreferenceRecord | SFTRecord | PromptRecord) -> list[Rendered | FieldError]:
        """Each sequence's ``(prompt_text, completion_text, field)``, or the ``FieldError`` its
        rendering raised (raised in ``encode_many`` where ``encode`` would raise it)."""
        if isinstance(record, PreferenceRecord):
            parts = [(record.prompt, record.chosen, "chosen"), (record.rejected_side_prompt, record.rejected, "rejected")]
        elif isinstance(record, SFTRecord):
            parts = [(record.prompt, record.completion, "completion")]
        else:
            raise FieldError("prompt", "a prompt-only record has no completion to train on")
        out: list[Rendered | FieldError] = []
        for prompt, completion, name in parts:
            try:
                out.append((*self._render(prompt, completion, name), name))
            except FieldError as e:
                out.append(e)
        return out

    def _example(self, record: PreferenceRecord | SFTRecord, rendered: list[Rendered | FieldError],
                 ids: list[tuple[list[int], list[int]] | None]) -> EncodedPair | EncodedExample:
        sequences = []
        for part, part_ids in zip(rendered, ids):
            if isinstance(part, FieldError):
                raise part
            sequences.append(self._assemble(*part_ids, part[1], part[2]))
        if isinstance(record, PreferenceRecord):
            return EncodedPair(sequences[0], sequences[1], record.index)
        return EncodedExample(sequences[0], record.index)

    @cached_property
    def _cuttable(self) -> bool:
        return cuttable(self.tokenizer)

    def _tokenized(self, parts: list[Rendered]) -> list[tuple[list[int], list[int]]]:
        """``(tok(prompt_text), tok(prompt_text + completion_text))`` of every part, from one call
        of the tokenizer's batch API; with a ``cuttable`` tokenizer the prompt's head is tokenized
        once (``jaxalign.data.prompt_cut``), and a part whose cut does not hold is tokenized whole."""
        plans = []  # (prompt text, tail or None, the text whose ids follow the prompt's head)
        for prompt_text, completion_text, _ in parts:
            k = last_cut(prompt_text) if self._cuttable else 0
            tail = prompt_text[k:] if k else None
            plans.append((prompt_text, tail, (tail if k else prompt_text) + completion_text))
        texts = list(dict.fromkeys(t for plan in plans for t in plan if t is not None))
        table = dict(zip(texts, batch_ids(self.tokenizer, texts)))
        out = []
        for (prompt_text, tail, rest), (_, completion_text, _) in zip(plans, parts):
            prompt_ids = table[prompt_text]
            if tail is None:
                out.append((prompt_ids, table[rest]))
                continue
            head = len(prompt_ids) - len(table[tail])
            if head >= 0 and prompt_ids[head:] == table[tail]:
                out.append((prompt_ids, prompt_ids[:head] + table[rest]))
            else:
                out.append((prompt_ids, self._ids(prompt_text + completion_text)))
        return out

    def encode_many(
        self, records: Sequence[PreferenceRecord | SFTRecord | PromptRecord]
    ) -> list[EncodedPair | EncodedExample | FieldError]:
        """``encode(record)`` for every record (its example, or the ``FieldError`` it raises), bit
        for bit, but tokenized in one call of the tokenizer's batch API (``_tokenized``)."""
        rendered: list[list[Rendered | FieldError] | FieldError] = []
        for record in records:
            try:
                rendered.append(self._rendered(record))
            except FieldError as e:
                rendered.append(e)
        tokens = iter(self._tokenized([
            part for parts in rendered if not isinstance(parts, FieldError)
            for part in parts if not isinstance(part, FieldError)
        ]))
        out: list[EncodedPair | EncodedExample | FieldError] = []
        for record, parts in zip(records, rendered):
            if isinstance(parts, FieldError):
                out.append(parts)
                continue
            ids = [None if isinstance(part, FieldError) else next(tokens) for part in parts]
            try:
                out.append(self._example(record, parts, ids))
            except FieldError as e:
                out.append(e)
        return out

    def encode_prompt(self, record: PromptRecord) -> np.ndarray:
        """Prompt ids (with BOS and the generation prompt) for sampling."""
        prompt_text, _ = self._render(record.prompt, None, "prompt")
        ids, _ = self._with_bos(self._ids(prompt_text))
        if not ids:
            raise FieldError("prompt", "encodes to no tokens")
        return np.asarray(ids, dtype=np.int32)
