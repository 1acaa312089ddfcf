"""Tokenized examples as flat arrays: one token array and offsets, read lazily.

``FlatExamples`` holds ``S`` sequences per example (2 for pairs, 1 for SFT), example-major:
sequence ``s`` of stored example ``e`` is ``tokens[starts[e*S + s] : starts[e*S + s + 1]]``
with ``prompt_lens[e*S + s]`` and ``has_bos[e*S + s]``; ``record_index[e]`` is its record index. The
arrays may be in memory or memory-mapped from a cache (``jaxalign.data.store``). It is a
``Sequence`` of ``EncodedPair`` / ``EncodedExample`` built on access (ids are views, not
copies), with what the loader needs without building them: ``lengths()`` and
``fingerprint()``; ``take(positions)`` selects examples without copying tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from jaxalign.data.encoding import EncodedExample, EncodedPair, EncodedSequence

__all__ = ["Example", "FlatExamples", "flatten", "join"]

Example = Union[EncodedPair, EncodedExample]
# Examples hashed per step of ``fingerprint`` (bounds its temporary arrays).
_HASH_CHUNK = 4096


@dataclass(frozen=True, eq=False)
class FlatExamples(Sequence):
    """Examples ``select`` (all when ``None``) of the flat arrays; see the module docstring."""

    tokens: np.ndarray  # int32 [T]
    starts: np.ndarray  # int64 [E*S + 1]
    prompt_lens: np.ndarray  # int32 [E*S]
    has_bos: np.ndarray  # bool [E*S]
    record_index: np.ndarray  # int64 [E]
    sequences_per_example: int
    select: np.ndarray | None = None  # int64 positions into the stored examples

    def _positions(self) -> np.ndarray:
        return np.arange(len(self.record_index)) if self.select is None else self.select

    def __len__(self) -> int:
        return len(self.record_index) if self.select is None else len(self.select)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        e = i % n if self.select is None else int(self.select[i])
        seqs = [self._sequence(e * self.sequences_per_example + s) for s in range(self.sequences_per_example)]
        index = int(self.record_index[e])
        return EncodedPair(seqs[0], seqs[1], index) if len(seqs) == 2 else EncodedExample(seqs[0], index)

    def _sequence(self, k: int) -> EncodedSequence:
        ids = np.asarray(self.tokens[int(self.starts[k]):int(self.starts[k + 1])])
        return EncodedSequence(ids=ids, prompt_len=int(self.prompt_lens[k]), has_bos=bool(self.has_bos[k]))

    def take(self, positions: np.ndarray) -> FlatExamples:
        """Examples ``positions`` of this sequence, in that order (the tokens are shared)."""
        chosen = self._positions()[np.asarray(positions, np.int64)]
        return FlatExamples(self.tokens, self.starts, self.prompt_lens, self.has_bos, self.record_index,
                            self.sequences_per_example, chosen)

    def _sequence_ids(self, positions: np.ndarray) -> np.ndarray:
        """Stored sequence numbers of the examples at stored ``positions``, ``[n, S]``."""
        return positions[:, None] * self.sequences_per_example + np.arange(self.sequences_per_example)

    def lengths(self) -> np.ndarray:
        """int64 ``[len, S]``: each example's sequence lengths (what shuffling and packing need)."""
        seq = self._sequence_ids(self._positions())
        return (self.starts[seq + 1] - self.starts[seq]).astype(np.int64)

    def fingerprint(self) -> str:
        """``EncodedDataset.fingerprint`` of these examples, computed on the arrays: the same
        bytes (each example's int64 index, each sequence's int64 prompt length and int32 ids)
        hashed in the same order."""
        h = hashlib.sha256()
        positions = self._positions()
        for a in range(0, len(positions), _HASH_CHUNK):
            h.update(self._hash_words(positions[a:a + _HASH_CHUNK]).tobytes())
        return h.hexdigest()[:16]

    def _hash_words(self, positions: np.ndarray) -> np.ndarray:
        """The little-endian int32 words hashed for the examples at stored ``positions``."""
        n, s = len(positions), self.sequences_per_example
        seq = self._sequence_ids(positions).reshape(-1)
        first, lens = self.starts[seq], self.starts[seq + 1] - self.starts[seq]
        block = (2 + lens).reshape(n, s)  # a sequence: prompt length (2 words), then its ids
        example_start = np.concatenate([[0], np.cumsum(2 + block.sum(axis=1))[:-1]])
        seq_start = (example_start[:, None] + 2 + np.cumsum(block, axis=1) - block).reshape(-1)
        out = np.empty(int(2 * n + block.sum()), "<i4")
        words = lambda x: np.asarray(x, "<i8").view("<i4").reshape(-1, 2)  # noqa: E731
        out[example_start], out[example_start + 1] = words(self.record_index[positions]).T
        out[seq_start], out[seq_start + 1] = words(self.prompt_lens[seq]).T
        before = np.cumsum(lens) - lens  # tokens of the earlier sequences in this chunk
        step = np.arange(int(lens.sum()))
        out[np.repeat(seq_start + 2 - before, lens) + step] = self.tokens[np.repeat(first - before, lens) + step]
        return out


def flatten(examples: Iterable[Example], sequences_per_example: int) -> FlatExamples:
    """In-memory ``FlatExamples`` of ``examples`` (each with ``sequences_per_example`` sequences)."""
    seqs: list[EncodedSequence] = []
    index: list[int] = []
    for e in examples:
        if len(e.sequences) != sequences_per_example:
            raise ValueError(f"example {e.index} has {len(e.sequences)} sequences, expected {sequences_per_example}")
        if any(s.side for s in e.sequences):
            raise ValueError(f"example {e.index} carries side arrays, which flat examples do not hold")
        seqs += e.sequences
        index.append(e.index)
    lens = np.asarray([len(s) for s in seqs], np.int64)
    return FlatExamples(
        tokens=np.concatenate([s.ids for s in seqs]).astype(np.int32) if seqs else np.zeros(0, np.int32),
        starts=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        prompt_lens=np.asarray([s.prompt_len for s in seqs], np.int32),
        has_bos=np.asarray([s.has_bos for s in seqs], bool),
        record_index=np.asarray(index, np.int64),
        sequences_per_example=sequences_per_example,
    )


def join(parts: Sequence[FlatExamples], sequences_per_example: int) -> FlatExamples:
    """The examples of ``parts`` (all stored, none selected) one after the other, in memory."""
    if any(p.select is not None for p in parts):
        raise ValueError("join takes whole FlatExamples, not selections")
    if not parts:
        return flatten([], sequences_per_example)
    shift = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
    return FlatExamples(
        tokens=np.concatenate([p.tokens for p in parts]),
        starts=np.concatenate([[0]] + [p.starts[1:] + d for p, d in zip(parts, shift)]).astype(np.int64),
        prompt_lens=np.concatenate([p.prompt_lens for p in parts]),
        has_bos=np.concatenate([p.has_bos for p in parts]),
        record_index=np.concatenate([p.record_index for p in parts]),
        sequences_per_example=sequences_per_example,
    )
