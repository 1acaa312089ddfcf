"""Deterministic, sharded, resumable batch iterator over tokenized examples.

Order. Epoch ``e`` visits the examples in the permutation drawn by
``numpy.random.default_rng([seed, e])`` (identity when ``shuffle=False``). Global batch ``k``
of the padded layout is ``order[k*B : (k+1)*B]`` (``B`` = ``batch_size``, the global number of
pairs per batch); shard ``q`` of ``C`` (``shard_index``/``shard_count``, default
``jax.process_index()``/``jax.process_count()``) loads the positions ``≡ q (mod C)`` of it:
``B / C`` slots. So shards are disjoint, cover every example once per epoch, and all shards
yield the same number of batches; the last batch of an epoch is completed with filler slots
(``pair_mask`` 0). Row length: the smallest bucket that fits the *global* batch, so every
shard pads to the same shape. Sequence ids and ``pair_mask``/``example_index`` use global
slot numbers (slot ``q * B/C + j``), so the per-shard batches concatenate (in shard order)
into one batch of the contract.

Packing (``packing=True``): each shard packs its own stream ``order[q::C]`` with
``plan_pack`` (first-fit decreasing), taking up to ``B / C`` pairs per batch and at most
``pack_rows`` rows of ``pack_length`` tokens (fewer pairs when the next one does not fit).
Batch ``k`` has as many rows as the shard that needs most of them uses, rounded up to a
multiple of ``row_multiple``, so that every shard's batch has the same shape while padding
stays small: a loader yields at most ``pack_rows / row_multiple`` shapes, one compilation
each. The epoch has as many batches as the longest shard's plan (every process computes all
shards' plans from the lengths alone, no communication); shorter shards end with all-filler
batches.

State. ``get_state()`` is a small JSON-serialisable dict (epoch, batch within the epoch, and
checks: seed, example count, data fingerprint, batch size, layout); ``set_state`` restores it
without replay (one epoch plan, from the lengths alone), after which the loader yields exactly
the batches an uninterrupted run would have yielded. The state is the same on every shard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign.data.batching import bucket_length, packed_batch, padded_batch, plan_pack
from jaxalign.data.dataset import EncodedDataset

__all__ = ["Loader"]

STATE_VERSION = 1
# How packed batches are planned; a saved packed position means nothing under another rule.
PACK_RULE = "first-fit-decreasing, rows as used"


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    return shard_index, shard_count


class Loader:
    """Iterator of batch dicts (see ``jaxalign/data/README.md`` and the module docstring)."""

    def __init__(
        self,
        dataset: EncodedDataset,
        *,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        mask: str = "completion",
        buckets: Sequence[int] = (64, 128, 256, 512),
        packing: bool = False,
        pack_length: int | None = None,
        pack_rows: int | None = None,
        row_multiple: int = 1,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        self.examples = dataset.examples
        self.report = dataset.report
        self.shard_index, self.shard_count = _default_shard(shard_index, shard_count)
        if batch_size < 1 or batch_size % self.shard_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of shard_count {self.shard_count}")
        if not self.examples:
            raise ValueError("the dataset holds no examples")
        self.batch_size = batch_size
        self.local_slots = batch_size // self.shard_count
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.mask = mask
        self.lengths = dataset.lengths()  # int64 [N, sequences per slot]: all an epoch plan needs
        self.seqs_per_slot = self.lengths.shape[1]
        self.max_len = self.lengths.max(axis=1)
        self.fingerprint = dataset.fingerprint()
        self.buckets = tuple(sorted(buckets))
        self.row_multiple = row_multiple
        self.packing = packing
        if packing:
            self.pack_length = pack_length or bucket_length(int(self.max_len.max()), buckets)
            if int(self.max_len.max()) > self.pack_length:
                raise ValueError(f"pack_length {self.pack_length} is shorter than the longest sequence {self.max_len.max()}")
            if pack_rows and (pack_rows < 0 or pack_rows % row_multiple):  # 0 / None: default_pack_rows
                raise ValueError(f"pack_rows {pack_rows} must be a positive multiple of {row_multiple} "
                                 "(the devices that split a batch's rows)")
            self.pack_rows = pack_rows or self.default_pack_rows(row_multiple)
        elif int(self.max_len.max()) > self.buckets[-1]:
            raise ValueError(f"the longest sequence ({self.max_len.max()}) exceeds the largest bucket {self.buckets[-1]}")
        self._epoch, self._batch = 0, 0
        self._plan_epoch: int | None = None
        self._plan: tuple[np.ndarray, list, list[tuple[int, int]]] | None = None

    def with_examples(self, examples: Sequence, **changes: Any) -> Loader:
        """A loader with this one's settings (shards, layout, order, mask, ...) over other
        examples; ``changes`` override settings by their constructor name. Packed rows are
        sized again for the new examples (with the same ``row_multiple``)."""
        settings: dict[str, Any] = dict(
            batch_size=self.batch_size, pad_id=self.pad_id, seed=self.seed, shuffle=self.shuffle,
            num_epochs=self.num_epochs, mask=self.mask, buckets=self.buckets, packing=self.packing,
            pack_length=self.pack_length if self.packing else None, row_multiple=self.row_multiple,
            shard_index=self.shard_index, shard_count=self.shard_count,
        )
        return Loader(EncodedDataset(examples, self.report), **{**settings, **changes})

    # -- shapes ---------------------------------------------------------------------------

    def default_pack_rows(self, row_multiple: int = 1) -> int:
        """The most rows a packed batch may take: room for a quarter more tokens than an average
        batch, plus one row, ``ceil(1.25 * mean tokens per slot * slots / pack_length) + 1``
        (a batch with more takes fewer pairs), rounded up to ``row_multiple``."""
        mean = float(np.mean(self.lengths.sum(axis=1)))
        rows = max(self.seqs_per_slot, math.ceil(1.25 * mean * self.local_slots / self.pack_length) + 1)
        return self._round_rows(rows, row_multiple)

    @staticmethod
    def _round_rows(rows: int, row_multiple: int) -> int:
        return max(1, -(-rows // row_multiple)) * row_multiple

    # -- epoch plans ------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _pack_shard(self, stream: np.ndarray) -> list[tuple[int, list, int]]:
        """Batches of one shard's stream: ``(first position in stream, placements, rows used)``."""
        lengths = [tuple(x) for x in self.lengths[stream].tolist()]
        out, start = [], 0
        while start < len(lengths):
            place, rows = plan_pack(
                lengths[start:start + self.local_slots], slots=self.local_slots, rows=self.pack_rows, length=self.pack_length
            )
            out.append((start, place, rows))
            start += len(place)
        return out

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, list, list[tuple[int, int]]]:
        """``(order, this shard's packed batches or [], (rows, length) of each batch)``."""
        if self._plan_epoch == epoch:
            return self._plan
        order = self._order(epoch)
        if self.packing:
            plans = [self._pack_shard(order[q::self.shard_count]) for q in range(self.shard_count)]
            used = np.zeros((len(plans), max(len(p) for p in plans)), np.int64)
            for q, p in enumerate(plans):
                used[q, :len(p)] = [rows for _, _, rows in p]
            shapes = [(self._round_rows(int(r), self.row_multiple), self.pack_length) for r in used.max(axis=0)]
            plan = (order, plans[self.shard_index], shapes)
        else:  # every global batch pads to the smallest bucket that fits its longest sequence
            longest = np.maximum.reduceat(self.max_len[order], np.arange(0, len(order), self.batch_size))
            rows = self.seqs_per_slot * self.local_slots
            plan = (order, [], [(rows, bucket_length(int(m), self.buckets)) for m in longest])
        self._plan_epoch, self._plan = epoch, plan
        return plan

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        return len(self._epoch_plan(self._epoch if epoch is None else epoch)[2])

    def batch_shapes(self, epoch: int) -> list[tuple[int, int]]:
        """``(rows, length)`` of this shard's batches in ``epoch``, without building them (what a
        caller compiles ahead of time)."""
        return list(self._epoch_plan(epoch)[2])

    # -- batches ----------------------------------------------------------------------------

    def batch_at(self, epoch: int, k: int) -> dict[str, np.ndarray]:
        """Batch ``k`` of ``epoch`` (what iteration yields there; the position does not move)."""
        order, shard_plan, shapes = self._epoch_plan(epoch)
        rows, length = shapes[k]
        offset = self.shard_index * self.local_slots
        common = dict(pad_id=self.pad_id, mask=self.mask, slot_offset=offset, total_slots=self.batch_size)
        if not self.packing:
            global_items = order[k * self.batch_size:(k + 1) * self.batch_size]
            mine = global_items[self.shard_index::self.shard_count]
            slots = [self.examples[i] for i in mine] + [None] * (self.local_slots - len(mine))
            return padded_batch(slots, length=length, sequences_per_slot=self.seqs_per_slot, **common)
        stream = order[self.shard_index::self.shard_count]
        slots: list = [None] * self.local_slots
        places: list = [None] * self.local_slots
        if k < len(shard_plan):
            start, place, _ = shard_plan[k]
            for j, pl in enumerate(place):
                slots[j], places[j] = self.examples[stream[start + j]], pl
        return packed_batch(slots, places, rows=rows, length=length, **common)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch_at(self._epoch, self._batch)
        self._batch += 1
        if self._batch >= self.batches_in_epoch(self._epoch):
            self._epoch, self._batch = self._epoch + 1, 0
        return batch

    @property
    def epoch(self) -> int:
        return self._epoch

    # -- state ------------------------------------------------------------------------------

    def _checks(self) -> dict[str, Any]:
        checks = {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": len(self.examples),
            "fingerprint": self.fingerprint,
            "batch_size": self.batch_size,
            "packing": self.packing,
        }
        if self.packing:  # packed batches depend on how the stream is split into shards
            checks.update(shard_count=self.shard_count, pack_rows=self.pack_rows, pack_length=self.pack_length,
                          pack_rule=PACK_RULE)
        return checks

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch is batch ``batch`` of epoch ``epoch``."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "batch": self._batch, **self._checks()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position from ``get_state``; ``ValueError`` if the data or settings differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, value in self._checks().items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state does not match this loader: {key} was {state.get(key)!r}, now {value!r} "
                    "(the data, its encoding or the loader settings changed since the state was saved)"
                )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch < 0 or epoch < 0 or batch >= self.batches_in_epoch(epoch):
            raise ValueError(f"loader state position epoch {epoch} batch {batch} is out of range")
        self._epoch, self._batch = epoch, batch
