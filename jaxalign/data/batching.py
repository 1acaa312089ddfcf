"""Fixed-shape batches in the contract of ``docs/architecture.md`` (padded or packed).

A batch is built from ``P`` *slots*; a slot holds a ``EncodedPair`` (two sequences: chosen,
rejected), an ``EncodedExample`` (SFT: one sequence) or ``None`` (a filler slot: pair_mask 0,
example_index -1, no tokens). Sequence ``s`` of slot ``p`` has sequence id ``p + s * P``
(chosen ``p``, rejected ``P + p``), shifted by ``slot_offset`` / computed with
``total_slots`` when the batch is one process's share of a global batch.

* Padded layout: ``R = S * P`` rows (``S`` sequences per slot); row ``s * P + p`` holds
  sequence ``s`` of slot ``p``, right-padded to ``L``.
* Packed layout: ``R`` rows of ``L`` tokens; ``plan_pack`` places sequences first-fit
  decreasing; each sequence gets its own segment id within its row and positions restarting
  at 0.

``loss_mask`` is label-aligned (``loss_mask[t]`` scores token ``t``, predicted from ``t - 1``):
``"completion"`` marks the completion tokens (EOS included, the first one too);
``"prompt_and_completion"`` (DOVE) marks every token but the first of the sequence (BOS, or
for a tokenizer without BOS the first prompt token, which has no context to be scored from).

Side arrays: each key of the sequences' ``EncodedSequence.side`` becomes a batch array ``[R, L]``
or ``[R, L, K]`` (its dtype), holding each token's values where the token lands and 0 at every
other position. All sequences of a batch must carry the same side keys, trailing shapes and
dtypes; a batch of filler slots only has none. *Token arrays* are the ``_row_fill`` keys and
every other key whose leading dims equal ``input_ids``' ``[R, L]`` (the side arrays; the ``[P]``
per-slot arrays never are): ``pad_batch`` pads them, ``stack_micro_batches`` through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np

from jaxalign.data.encoding import EncodedExample, EncodedPair, EncodedSequence

__all__ = [
    "BATCH_KEYS",
    "MASK_MODES",
    "bucket_ladder",
    "bucket_length",
    "loss_mask",
    "packed_batch",
    "pad_batch",
    "padded_batch",
    "plan_pack",
    "stack_micro_batches",
]

Slot = Union[EncodedPair, EncodedExample, None]
MaskMode = Literal["completion", "prompt_and_completion"]
MASK_MODES = ("completion", "prompt_and_completion")
BATCH_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask", "example_index")

# One placement per sequence of a slot: (row, start offset within the row).
Placement = tuple[tuple[int, int], ...]
# A side array's layout: its trailing shape (after the token axis) and dtype.
SideSpec = tuple[tuple[int, ...], np.dtype]


def bucket_ladder(limit: int, smallest: int = 64) -> tuple[int, ...]:
    """Padded lengths: powers of two from ``smallest`` below ``limit``, then ``limit``."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return (*out, limit)


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


def _row_fill(pad_id: int) -> dict[str, int]:
    """The ``[R, L]`` token arrays of a batch and the value of an empty (padding) position in each."""
    return {"input_ids": pad_id, "positions": 0, "segment_ids": 0, "loss_mask": 0, "sequence_ids": -1}


def _token_fill(batch: Mapping[str, Any], pad_id: int) -> dict[str, int]:
    """The token arrays of ``batch`` and their empty-position value: the ``_row_fill`` keys, and
    (side arrays, 0) every other key whose leading dims are ``input_ids``' ``[R, L]``."""
    fill = _row_fill(pad_id)
    shape = np.shape(batch["input_ids"])
    return fill | {key: 0 for key, value in batch.items() if key not in fill and np.shape(value)[:2] == shape}


def pad_batch(batch: dict[str, np.ndarray], *, rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """``batch`` with its token arrays (``[R, L]``, side arrays ``[R, L, K]`` too) padded by empty
    rows and columns to ``[rows, length]`` (token ``pad_id``, segment 0, side values 0: no
    sequence sees them, no sum counts them)."""
    r, n = batch["input_ids"].shape
    if (r, n) == (rows, length):
        return batch
    if rows < r or length < n:
        raise ValueError(f"cannot pad a [{r}, {n}] batch to [{rows}, {length}]")
    out = dict(batch)
    for key, fill in _token_fill(batch, pad_id).items():
        width = [(0, rows - r), (0, length - n)] + [(0, 0)] * (np.ndim(batch[key]) - 2)
        out[key] = np.pad(batch[key], width, constant_values=fill)
    return out


def stack_micro_batches(batches: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Stacks ``A`` micro-batches (same keys) into one ``[A, ...]`` step batch, their token
    arrays first padded to the largest rows and length among them (``pad_batch``: padded
    batches differ in length, packed ones in rows; empty positions change no sum)."""
    keys = batches[0].keys()
    for i, b in enumerate(batches):
        if b.keys() != keys:
            raise ValueError(f"micro-batch {i} has keys {sorted(b)}, expected {sorted(keys)}")
    rows = max(b["input_ids"].shape[0] for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    batches = [pad_batch(b, rows=rows, length=length, pad_id=pad_id) for b in batches]
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}


def _side_specs(seq: EncodedSequence) -> dict[str, SideSpec]:
    return {key: (value.shape[1:], value.dtype) for key, value in seq.side.items()}


def _describe(spec: SideSpec | None) -> str:
    """``"[n, K] dtype"``, or ``"missing"``."""
    return "missing" if spec is None else f"[{', '.join(map(str, ('n', *spec[0])))}] {spec[1]}"


def _batch_side_specs(slots: Sequence[Slot]) -> dict[str, SideSpec]:
    """The side arrays of a batch (sorted by key): those of its first sequence, which every
    sequence must share (``ValueError`` naming the example and key otherwise)."""
    seqs = [(slot.index, seq) for slot in slots if slot is not None for seq in slot.sequences]
    specs = _side_specs(seqs[0][1]) if seqs else {}
    for index, seq in seqs:
        other = _side_specs(seq)
        for key in sorted(specs.keys() | other.keys()):
            if specs.get(key) != other.get(key):
                raise ValueError(f"example {index}: side array {key!r} is {_describe(other.get(key))}, "
                                 f"in the batch's first sequence {_describe(specs.get(key))}")
    clash = sorted(specs.keys() & set(BATCH_KEYS))
    if clash:
        raise ValueError(f"side arrays {clash} would overwrite batch keys")
    return dict(sorted(specs.items()))


def _empty(rows: int, length: int, pad_id: int, slots: Sequence[Slot]) -> dict[str, np.ndarray]:
    """An all-empty batch of ``len(slots)`` filler slots, with the slots' side arrays (zeros)."""
    batch = {key: np.full((rows, length), fill, np.float32 if key == "loss_mask" else np.int32)
             for key, fill in _row_fill(pad_id).items()}
    batch.update(pair_mask=np.zeros((len(slots),), np.float32), example_index=np.full((len(slots),), -1, np.int64))
    batch.update({key: np.zeros((rows, length, *trailing), dtype)
                  for key, (trailing, dtype) in _batch_side_specs(slots).items()})
    return batch


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
            for key, value in seq.side.items():
                batch[key][row, start:end] = value
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
    batch = _empty(n_seq * n, length, pad_id, slots)
    return _fill(batch, slots, placements, segment_of, mask=mask, slot_offset=slot_offset,
                 total_slots=n if total_slots is None else total_slots)


def _first_fit_decreasing(
    lengths: Sequence[tuple[int, ...]], rows: int, length: int
) -> tuple[list[Placement], int] | None:
    """Every sequence of every item, longest first, into the first of ``rows`` rows with room.
    Returns the placements per item and the rows used, or None if they need more rows."""
    order = sorted(((n, i, s) for i, item in enumerate(lengths) for s, n in enumerate(item)), key=lambda t: -t[0])
    fill = np.zeros(rows, np.int64)
    place: list[list[tuple[int, int]]] = [[(0, 0)] * len(item) for item in lengths]
    for n, i, s in order:
        row = int(np.argmax(fill + n <= length))
        if fill[row] + n > length:
            return None
        place[i][s] = (row, int(fill[row]))
        fill[row] += n
    return [tuple(p) for p in place], int(np.count_nonzero(fill))


def plan_pack(
    lengths: Sequence[tuple[int, ...]], *, slots: int, rows: int, length: int
) -> tuple[list[Placement], int]:
    """Packs the longest run of leading items of ``lengths[:slots]`` that fits ``rows`` rows
    of ``length`` tokens (``lengths[i]``: the sequence lengths of item ``i``).

    Placement is first-fit decreasing: the batch's sequences, longest first, each into the
    first row with room (ties in item order). Returns the items' placements (their number is
    the number of items taken) and the number of rows they use, which are the first ones.
    ``ValueError`` if the first item alone does not fit.
    """
    items = list(lengths[:slots])
    # a prefix with more tokens than the rows hold cannot fit: start from the longest that might
    might_fit = int(np.count_nonzero(np.cumsum([sum(item) for item in items]) <= rows * length))
    for n in range(might_fit, 0, -1):
        placed = _first_fit_decreasing(items[:n], rows, length)
        if placed is not None:
            return placed
    first = items[0] if items else ()
    raise ValueError(f"an item with sequence lengths {first} does not fit {rows} rows of {length} tokens")


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
    batch = _empty(rows, length, pad_id, slots)
    return _fill(batch, slots, placements, segment_of, mask=mask, slot_offset=slot_offset,
                 total_slots=len(slots) if total_slots is None else total_slots)
