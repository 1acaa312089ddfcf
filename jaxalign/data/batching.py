"""Fixed-shape batches in the contract of ``docs/architecture.md`` (padded or packed).

A batch is built from ``P`` *slots*; a slot holds a ``EncodedPair`` (two sequences: chosen,
rejected), an ``EncodedExample`` (SFT: one sequence) or ``None`` (a filler slot: pair_mask 0,
example_index -1, no tokens). Sequence ``s`` of slot ``p`` has sequence id ``p + s * P``
(chosen ``p``, rejected ``P + p``), shifted by ``slot_offset`` / computed with
``total_slots`` when the batch is one process's share of a global batch.

* Padded layout: ``R = S * P`` rows (``S`` sequences per slot); row ``s * P + p`` holds
  sequence ``s`` of slot ``p``, right-padded to ``L``.
* Packed layout: ``R`` rows of ``L`` tokens; ``plan_pack`` places sequences first-fit; each
  sequence gets its own segment id within its row and positions restarting at 0.

``loss_mask`` is label-aligned (``loss_mask[t]`` scores token ``t``, predicted from ``t - 1``):
``"completion"`` marks the completion tokens (EOS included, the first one too);
``"prompt_and_completion"`` (DOVE) marks every token but the first of the sequence (BOS, or
for a tokenizer without BOS the first prompt token, which has no context to be scored from).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import numpy as np

from jaxalign.data.encoding import EncodedExample, EncodedPair, EncodedSequence

__all__ = [
    "BATCH_KEYS",
    "MASK_MODES",
    "bucket_length",
    "loss_mask",
    "packed_batch",
    "padded_batch",
    "plan_pack",
]

Slot = Union[EncodedPair, EncodedExample, None]
MaskMode = Literal["completion", "prompt_and_completion"]
MASK_MODES = ("completion", "prompt_and_completion")
BATCH_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask", "example_index")

# One placement per sequence of a slot: (row, start offset within the row).
Placement = tuple[tuple[int, int], ...]


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= n``; ``ValueError`` when ``n`` exceeds every bucket."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(f"sequence length {n} exceeds the largest bucket {max(buckets)}")


def loss_mask(seq: EncodedSequence, mode: MaskMode) -> np.ndarray:
    """float32 ``[len(seq)]`` label-aligned mask of the tokens that count (see module docstring)."""
    t = np.arange(len(seq))
    if mode == "completion":
        return (t >= seq.prompt_len).astype(np.float32)
    if mode == "prompt_and_completion":
        return (t >= 1).astype(np.float32)
    raise ValueError(f"loss mask mode {mode!r} is not one of {', '.join(MASK_MODES)}")


def _empty(rows: int, length: int, pad_id: int, slots: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((rows, length), pad_id, np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "loss_mask": np.zeros((rows, length), np.float32),
        "sequence_ids": np.full((rows, length), -1, np.int32),
        "pair_mask": np.zeros((slots,), np.float32),
        "example_index": np.full((slots,), -1, np.int64),
    }


def _fill(
    batch: dict[str, np.ndarray],
    slots: Sequence[Slot],
    placements: Sequence[Placement | None],
    segment_of: dict[tuple[int, int], int],
    *,
    mask: MaskMode,
    slot_offset: int,
    total_slots: int,
) -> dict[str, np.ndarray]:
    for p, (slot, place) in enumerate(zip(slots, placements)):
        if slot is None:
            continue
        batch["pair_mask"][p] = 1.0
        batch["example_index"][p] = slot.index
        for s, (seq, (row, start)) in enumerate(zip(slot.sequences, place)):
            end = start + len(seq)
            batch["input_ids"][row, start:end] = seq.ids
            batch["positions"][row, start:end] = np.arange(len(seq))
            batch["segment_ids"][row, start:end] = segment_of[(row, start)]
            batch["loss_mask"][row, start:end] = loss_mask(seq, mask)
            batch["sequence_ids"][row, start:end] = slot_offset + p + s * total_slots
    return batch


def _sequences_per_slot(slots: Sequence[Slot]) -> int:
    kinds = {len(s.sequences) for s in slots if s is not None}
    if len(kinds) > 1:
        raise ValueError("a batch mixes preference pairs and single (SFT) examples")
    return kinds.pop() if kinds else 2


def padded_batch(
    slots: Sequence[Slot],
    *,
    length: int,
    pad_id: int,
    mask: MaskMode = "completion",
    sequences_per_slot: int | None = None,
    slot_offset: int = 0,
    total_slots: int | None = None,
) -> dict[str, np.ndarray]:
    """Padded layout: row ``s * P + p`` is sequence ``s`` of slot ``p``, right-padded to ``length``."""
    n_seq = sequences_per_slot or _sequences_per_slot(slots)
    n = len(slots)
    placements = [None if slot is None else tuple((s * n + p, 0) for s in range(n_seq)) for p, slot in enumerate(slots)]
    for slot in slots:
        if slot is not None and max(len(s) for s in slot.sequences) > length:
            raise ValueError(f"example {slot.index}: a sequence is longer than the row length {length}")
    segment_of = {place: 1 for pl in placements if pl for place in pl}
    batch = _empty(n_seq * n, length, pad_id, n)
    return _fill(batch, slots, placements, segment_of, mask=mask, slot_offset=slot_offset,
                 total_slots=n if total_slots is None else total_slots)


def plan_pack(
    lengths: Sequence[tuple[int, ...]], *, slots: int, rows: int, length: int
) -> tuple[list[Placement], int]:
    """First-fit placement of consecutive items into ``rows`` rows of ``length`` tokens.

    ``lengths[i]`` holds the sequence lengths of item ``i``. Items are taken in order while
    there is a free slot and all of the item's sequences fit (each in the first row with room);
    the first item that does not fit closes the batch. Returns the placements and the number
    of items taken. ``ValueError`` if the first item does not fit in an empty batch.
    """
    fill = [0] * rows
    out: list[Placement] = []
    for item in lengths[:slots]:
        trial = list(fill)
        place = []
        for n in item:
            row = next((r for r in range(rows) if trial[r] + n <= length), None)
            if row is None:
                break
            place.append((row, trial[row]))
            trial[row] += n
        if len(place) < len(item):
            if not out:
                raise ValueError(f"an item with sequence lengths {item} does not fit {rows} rows of {length} tokens")
            break
        fill = trial
        out.append(tuple(place))
    return out, len(out)


def packed_batch(
    slots: Sequence[Slot],
    placements: Sequence[Placement | None],
    *,
    rows: int,
    length: int,
    pad_id: int,
    mask: MaskMode = "completion",
    slot_offset: int = 0,
    total_slots: int | None = None,
) -> dict[str, np.ndarray]:
    """Packed layout from ``plan_pack`` placements (``None`` for filler slots)."""
    starts: dict[int, list[int]] = {}
    for place in placements:
        for row, start in place or ():
            starts.setdefault(row, []).append(start)
    segment_of = {(row, start): i + 1 for row, ss in starts.items() for i, start in enumerate(sorted(ss))}
    batch = _empty(rows, length, pad_id, len(slots))
    return _fill(batch, slots, placements, segment_of, mask=mask, slot_offset=slot_offset,
                 total_slots=len(slots) if total_slots is None else total_slots)
