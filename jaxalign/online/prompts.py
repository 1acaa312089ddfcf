"""The prompts of an online run: read, encoded, filtered, held out, and dealt out to rounds.

``load_prompts`` reads every row of a source (prompt-only rows; preference or SFT rows give
their prompt), renders it with the policy's chat template and tokenizes it as the sampler will
see it (``Encoder.encode_prompt``). A prompt longer than ``max_prompt_length`` tokens is
dropped and counted; a bad row is an error naming its file and line, or a counted skip
(``on_bad_record="skip"``). The row's other columns ride along as the prompt's ``metadata``
(e.g. the gold answer a verifiable reward function checks).

Schedule (``round_positions``): the training prompts form an endless stream, epoch ``e`` in
the order ``numpy.random.default_rng([seed, e]).permutation(N)``; round ``r`` (1-based) takes
stream positions ``(r-1)*M .. r*M-1`` (``M`` = prompts per round). The stream position is the
prompt's sampling index (``jaxalign.sampling.sample``'s ``prompt_indices``), so each round's
samples depend on the seed, the round and the prompt alone. Process ``q`` of ``C`` samples the
positions ``q, q+C, ...`` of its round.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from jaxalign.data.encoding import Encoder
from jaxalign.data.formats import KeyMap, parse_row
from jaxalign.data.records import BadRecord, DataError, FieldError, PromptRecord, Text
from jaxalign.data.sources import iter_rows

__all__ = ["Prompt", "PromptSet", "load_prompts", "round_positions", "split_eval"]

# Columns of a row that are the record itself, not metadata for a reward function.
_RECORD_COLUMNS = ("prompt", "chosen", "rejected", "completion", "rejected_prompt", "messages")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its index in the source's good rows, its text (or messages), its ids, the
    row's other columns, and where it came from."""

    index: int
    text: Text
    ids: np.ndarray
    metadata: dict[str, Any]
    where: str


@dataclasses.dataclass
class PromptSet:
    """The usable prompts of a source and what was dropped (``counts``: reason -> number)."""

    prompts: list[Prompt]
    counts: Counter

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items())) or "none"
        return f"{len(self.prompts)} prompts (dropped: {dropped})"


def load_prompts(source: str, tokenizer: Any, *, max_prompt_length: int, keys: KeyMap = KeyMap(),
                 on_bad_record: str = "error") -> PromptSet:
    """The prompts of ``source`` (see the module docstring); ``DataError`` names a bad row and
    ``ValueError`` a source with no usable prompt."""
    encoder = Encoder(tokenizer)
    prompts: list[Prompt] = []
    counts: Counter = Counter()
    for file, line, row in iter_rows(source):
        try:
            if isinstance(row, FieldError):
                raise row
            record = parse_row(row, keys=keys)
            ids = encoder.encode_prompt(PromptRecord(record.prompt))
        except FieldError as e:
            if on_bad_record == "error":
                raise DataError(BadRecord(file, line, e.field, e.problem)) from None
            counts["bad rows"] += 1
            continue
        if len(ids) > max_prompt_length:
            counts[f"longer than data.max_prompt_length={max_prompt_length} tokens"] += 1
            continue
        renamed = keys.apply(row)
        source_columns = (keys.prompt, keys.chosen, keys.rejected)  # renamed into record columns
        metadata = {k: v for k, v in renamed.items() if k not in _RECORD_COLUMNS and k not in source_columns}
        prompts.append(Prompt(len(prompts), record.prompt, ids, metadata, f"{file}:{line}"))
    if not prompts:
        reasons = f" ({', '.join(f'{n} {why}' for why, n in counts.items())})" if counts else ""
        raise ValueError(f"{source}: no usable prompt{reasons}")
    return PromptSet(prompts, counts)


def split_eval(prompts: list[Prompt], count: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, eval)``: ``count`` prompts held out by a seeded permutation (both in source order)."""
    if count == 0:
        return prompts, []
    if count >= len(prompts):
        raise ValueError(f"cannot hold out {count} eval prompts of {len(prompts)} (online.eval_prompts): "
                         "lower it, or give held-out prompts in data.eval")
    held = set(np.random.default_rng([seed, 0xE7A1]).permutation(len(prompts))[:count].tolist())
    return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


def round_positions(round_index: int, per_round: int) -> np.ndarray:
    """The stream positions of round ``round_index`` (1-based): ``(r-1)*M .. r*M - 1``."""
    return np.arange((round_index - 1) * per_round, round_index * per_round, dtype=np.int64)


def at_positions(positions: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The prompt (index into the training prompts) at each stream position."""
    epochs = positions // count
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(count)
        chosen = epochs == epoch
        out[chosen] = order[positions[chosen] % count]
    return out
