"""Teacher caches of distillation (docs/losses.md section 5), computed once and keyed by a fingerprint.

* ``teacher_topk_loader`` (DCKD): the teacher's top-k next-token ids and probabilities at every
  scored (completion) token of both responses of each pair.
* ``advantage_loader`` (ADPA): at every completion token of each pair's rejected sequence (the
  student's own generation, the state), the DPO teacher's top-k ids ``a`` as candidates and the
  advantages ``A(s, a) = log pi_dpo(a | s) - log pi_ref(a | s)``, in two passes (``candidate_pass``
  with the DPO teacher, then ``advantage_pass`` with its reference) so that the two models are
  never on the devices together.

A pass runs ``fn`` (this process's host batch -> global arrays ``[R, L, K]``, e.g.
``scoring.topk.teacher_topk_fn`` on ``parallel.global_batch``) over one unshuffled epoch of the
loader's examples (``caches.reference.cache_loader``: the training layout, padded or packed,
``batch_size`` pairs per global batch); each process loads its shard and gathers the global
layout, so every process holds the whole cache and process 0 writes it (``write``).

Store (an ``ArrayStore`` at ``CACHE_DIR/<kind>-<key>``): ``indices [N]`` (example_index,
ascending), ``offsets [N * S + 1]`` (``S`` sequences per example) and per key a flat ``[T, K]``
array whose rows ``offsets[i * S + s]:offsets[i * S + s + 1]`` are the scored tokens of sequence
``s`` of example ``i``, in order (a suffix of the sequence under either loss mask). Teacher
probabilities are stored as float16, ids as int32, advantages as float32. Read memory-mapped and
attached as ``StoredSide`` views that build a sequence's ``[n, K]`` array (0 on unscored tokens)
only when a batch is built, so a cache larger than host memory streams from disk.

The key covers the teacher weights and the tokenizer (``digests``, from the caller, with any
setting the numbers depend on, e.g. the compute dtype), the examples' fingerprint (token ids:
template and truncation), the loss mask and ``k``. A different key is another directory: no
cache is ever overwritten by another teacher's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxalign import parallel
from jaxalign.caches.fingerprint import fingerprint, host_array
from jaxalign.caches.reference import cache_loader
from jaxalign.data.batching import loss_mask
from jaxalign.data.encoding import EncodedExample, EncodedPair
from jaxalign.data.loader import Loader
from jaxalign.data.store import ArrayStore

__all__ = [
    "SideCache",
    "StoredSide",
    "advantage_cache_path",
    "advantage_loader",
    "advantage_pass",
    "candidate_pass",
    "check_vocabulary",
    "teacher_topk_loader",
    "topk_cache_path",
]

HostBatch = dict[str, np.ndarray]
PassFn = Callable[[HostBatch], Any]  # host batch -> global jax arrays [R, L, K] (one, or a tuple)
Progress = Callable[[Loader, str], Iterable[HostBatch]]  # (cache pass, its name) -> batches


def _no_progress(loader: Loader, name: str) -> Iterable[HostBatch]:
    return loader


class StoredSide:
    """A sequence's side array ``[length, K]`` over stored ``rows [m, K]`` (a slice of a
    memory-mapped store): the rows at the last ``m`` positions, 0 before, as ``dtype``. Built by
    ``np.asarray`` (as batching does) when a batch is made; holding one reads nothing."""

    ndim = 2

    def __init__(self, rows: np.ndarray, length: int, dtype: Any):
        self.rows = rows
        self.shape = (length, rows.shape[1])
        self.dtype = np.dtype(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.zeros(self.shape, self.dtype)
        if len(self.rows):
            out[self.shape[0] - len(self.rows):] = self.rows
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class SideCache:
    """Per-token arrays of ``S`` sequences per example (see the module docstring)."""

    indices: np.ndarray
    offsets: np.ndarray
    arrays: dict[str, np.ndarray]

    @property
    def sequences_per_example(self) -> int:
        return (len(self.offsets) - 1) // max(len(self.indices), 1)

    def save(self, path: str) -> None:
        ArrayStore(path).write({"indices": self.indices, "offsets": self.offsets, **self.arrays})

    @classmethod
    def load(cls, path: str) -> SideCache:
        """The cache at ``path``, memory-mapped."""
        arrays = ArrayStore(path).read()
        return cls(arrays.pop("indices"), arrays.pop("offsets"), arrays)

    def check(self, loader: Loader, where: str) -> None:
        """``ValueError`` (naming ``where``) unless this holds exactly the loader's examples, each
        sequence with as many rows as the loader's mask scores."""
        expected = np.sort(np.asarray([e.index for e in loader.examples], np.int64))
        if not np.array_equal(np.asarray(self.indices), expected) or self.sequences_per_example != loader.seqs_per_slot:
            raise ValueError(f"teacher cache {where} does not hold the {len(expected)} examples of this data "
                             f"({len(self.indices)} examples, {self.sequences_per_example} sequences each)")
        counts = np.diff(np.asarray(self.offsets))
        for e in loader.examples:
            row = int(np.searchsorted(self.indices, e.index)) * self.sequences_per_example
            for s, seq in enumerate(e.sequences):
                scored = loss_mask(seq, loader.mask) > 0
                m = int(counts[row + s])
                if m != int(scored.sum()) or not scored[len(seq) - m:].all():
                    raise ValueError(f"teacher cache {where}: example {e.index} sequence {s} has {m} stored tokens, "
                                     f"the data scores {int(scored.sum())}")

    def rows(self, index: int, s: int) -> dict[str, np.ndarray]:
        """The stored rows of sequence ``s`` of example ``index`` (views)."""
        i = int(np.searchsorted(self.indices, index)) * self.sequences_per_example + s
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return {key: value[start:stop] for key, value in self.arrays.items()}


def _compute(loader: Loader, fn: PassFn, names: tuple[str, ...], *, batch_size: int, progress: Progress,
             name: str) -> SideCache:
    """Runs ``fn`` over one epoch of ``cache_loader(loader, batch_size)`` and keeps, per sequence,
    the rows of its scored tokens of each output (named ``names``). The next batch is dispatched
    before the previous one's outputs are copied to the host."""
    per_sequence: dict[tuple[int, int], list[np.ndarray]] = {}
    spp = loader.seqs_per_slot

    def collect(outputs: tuple[jax.Array, ...], seq: np.ndarray, scored: np.ndarray, index: np.ndarray) -> None:
        flat = [host_array(o).reshape(seq.size, -1) for o in outputs]
        seq = seq.reshape(-1)
        positions = np.flatnonzero((scored.reshape(-1) > 0) & (seq >= 0))
        positions = positions[np.argsort(seq[positions], kind="stable")]  # by sequence, in token order
        p = len(index)
        bounds = np.searchsorted(seq[positions], np.arange(spp * p + 1))
        for sid in range(spp * p):  # sequence s of slot q has id s * P + q
            if index[sid % p] >= 0:
                rows = positions[bounds[sid]:bounds[sid + 1]]
                per_sequence[(int(index[sid % p]), sid // p)] = [f[rows] for f in flat]

    pending = None
    for batch in progress(cache_loader(loader, batch_size), name):
        outputs = fn(batch)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        layout = tuple(parallel.gathered_rows(np.asarray(batch[k])) for k in ("sequence_ids", "loss_mask", "example_index"))
        if pending is not None:
            collect(*pending)
        pending = (outputs, *layout)
    if pending is None:
        raise ValueError(f"the {name} pass yielded no batches")
    collect(*pending)
    keys = sorted(per_sequence)
    indices = np.asarray(sorted({i for i, _ in keys}), np.int64)
    if len(keys) != len(indices) * spp:
        raise ValueError(f"the {name} pass saw {len(keys)} sequences of {len(indices)} examples")
    lengths = [len(per_sequence[key][0]) for key in keys]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {n: np.concatenate([per_sequence[key][j] for key in keys]) for j, n in enumerate(names)}
    return SideCache(indices, offsets, arrays)


def _with_sequences(example: Any, sequences: list) -> Any:
    if isinstance(example, EncodedPair):
        return dataclasses.replace(example, chosen=sequences[0], rejected=sequences[1])
    if isinstance(example, EncodedExample):
        return dataclasses.replace(example, sequence=sequences[0])
    raise TypeError(f"cannot attach teacher arrays to a {type(example).__name__}")


def _attach(loader: Loader, cache: SideCache, dtypes: Mapping[str, Any], sources: tuple[int | None, ...]) -> Loader:
    """``loader`` whose example sequence ``s`` carries the cache's sequence ``sources[s]`` as
    side arrays ``dtypes`` (name -> dtype); ``None``: zeros of the same shape."""
    width = {name: cache.arrays[name].shape[1] for name in dtypes}
    empty = {name: np.zeros((0, width[name]), cache.arrays[name].dtype) for name in dtypes}
    examples = []
    for e in loader.examples:
        sequences = []
        for seq, source in zip(e.sequences, sources, strict=True):
            rows = empty if source is None else cache.rows(e.index, source)
            side = {**seq.side, **{n: StoredSide(rows[n], len(seq), dtype) for n, dtype in dtypes.items()}}
            sequences.append(dataclasses.replace(seq, side=side))
        examples.append(_with_sequences(e, sequences))
    return loader.with_examples(examples)


def _load_or_compute(path: str, loader: Loader, compute: Callable[[], SideCache], write: bool) -> SideCache:
    """The cache at ``path`` (checked against ``loader``), or ``compute()`` saved there (``write``)."""
    if ArrayStore(path).exists():
        cache = SideCache.load(path)
        cache.check(loader, f"{path} (delete the directory to recompute it)")
        return cache
    cache = compute()
    cache.check(loader, f"computed for {path}")
    if write:
        cache.save(path)
    return cache


def topk_cache_path(loader: Loader, *, cache_dir: str, digests: Mapping[str, Any], k: int) -> str:
    """Where ``teacher_topk_loader`` keeps the cache of ``loader``'s examples."""
    key = fingerprint(kind="teacher_topk", examples=loader.fingerprint, mask=loader.mask, k=k, **digests)
    return os.path.join(cache_dir, f"teacher-topk-{key}")


def teacher_topk_loader(
    loader: Loader, teacher: Callable[[], PassFn], *, cache_dir: str, digests: Mapping[str, Any], k: int,
    batch_size: int, write: bool, progress: Progress = _no_progress,
) -> Loader:
    """``loader`` whose sequences carry ``teacher_topk_ids [n, k]`` int32 and
    ``teacher_topk_probs [n, k]`` float32 (the teacher's top-k at each scored token, 0 elsewhere),
    from the cache at ``topk_cache_path``, computed when absent. ``teacher()`` is called only
    then and returns the pass ``host batch -> (ids, probs)`` global ``[R, L, k]``: a factory that
    loads the teacher, so that a cached run never loads it."""

    def compute() -> SideCache:
        fn = teacher()
        return _compute(loader, _checked(fn, k), ("teacher_topk_ids", "teacher_topk_probs"), batch_size=batch_size,
                        progress=progress, name="teacher top-k")

    cache = _load_or_compute(topk_cache_path(loader, cache_dir=cache_dir, digests=digests, k=k), loader,
                             _stored({"teacher_topk_ids": np.int32, "teacher_topk_probs": np.float16}, compute), write)
    dtypes = {"teacher_topk_ids": np.int32, "teacher_topk_probs": np.float32}
    return _attach(loader, cache, dtypes, tuple(range(loader.seqs_per_slot)))


def _checked(fn: PassFn, k: int) -> PassFn:
    """``fn`` with its outputs' last axis checked to be ``k``."""

    def run(batch: HostBatch) -> tuple[jax.Array, ...]:
        outputs = fn(batch)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if any(o.shape[-1] != k for o in outputs):
            shapes = [list(o.shape) for o in outputs]
            raise ValueError(f"the teacher pass returned shapes {shapes}, expected [R, L, {k}]")
        return outputs

    return run


def _stored(dtypes: Mapping[str, Any], compute: Callable[[], SideCache]) -> Callable[[], SideCache]:
    """``compute`` with its arrays cast to their stored ``dtypes``: a computed cache equals a loaded one."""

    def run() -> SideCache:
        cache = compute()
        return SideCache(cache.indices, cache.offsets, {n: cache.arrays[n].astype(d) for n, d in dtypes.items()})

    return run


def _states(loader: Loader) -> Loader:
    """A loader of each pair's rejected sequence alone (the ADPA state), same settings."""
    return loader.with_examples([EncodedExample(e.rejected, e.index) for e in loader.examples])


def candidate_pass(states: Loader, dpo_topk: PassFn, *, k: int, batch_size: int,
                   progress: Progress = _no_progress) -> SideCache:
    """ADPA pass 1 over ``states`` (one sequence per example): the DPO teacher's top-k
    (``dpo_topk``: host batch -> global ``(ids, probs) [R, L, k]``) as ``candidate_ids`` and its
    log-probs at them, ``dpo_logps = log probs`` (float32; a probability that underflowed float32
    is read as its smallest normal, 1.2e-38)."""
    cache = _compute(states, _checked(dpo_topk, k), ("candidate_ids", "dpo_probs"), batch_size=batch_size,
                     progress=progress, name="candidates")
    ids, probs = cache.arrays["candidate_ids"], cache.arrays["dpo_probs"].astype(np.float32)
    dpo_logps = np.log(np.maximum(probs, np.finfo(np.float32).tiny))  # a float32 underflow would give -inf
    return SideCache(cache.indices, cache.offsets, {"candidate_ids": ids.astype(np.int32), "dpo_logps": dpo_logps})


def advantage_pass(states: Loader, candidates: SideCache, reference_logps: PassFn, *, batch_size: int,
                   progress: Progress = _no_progress) -> SideCache:
    """ADPA pass 2: the reference's log-probs at the candidates (``reference_logps``: host batch
    carrying ``candidate_ids [R, L, k]`` -> global log-probs ``[R, L, k]``, e.g.
    ``scoring.topk.candidate_logps_fn(forward, "candidate_ids")``) and
    ``advantages = dpo_logps - reference log-probs`` (float32), exact for every candidate.

    (The released code stored only each model's top-50 and imputed a reference probability for
    candidates outside the reference's top-50; with both models at hand the exact value is used.)"""
    with_ids = _attach(states, candidates, {"candidate_ids": np.int32}, (0,))
    reference = _compute(with_ids, reference_logps, ("reference_logps",), batch_size=batch_size, progress=progress,
                         name="reference log-probs")
    if not (np.array_equal(reference.indices, candidates.indices)
            and np.array_equal(reference.offsets, candidates.offsets)):
        raise ValueError("the reference pass scored other tokens than the candidate pass")
    advantages = candidates.arrays["dpo_logps"] - reference.arrays["reference_logps"].astype(np.float32)
    return SideCache(candidates.indices, candidates.offsets,
                     {"candidate_ids": candidates.arrays["candidate_ids"], "advantages": advantages.astype(np.float32)})


def advantage_cache_path(loader: Loader, *, cache_dir: str, digests: Mapping[str, Any], k: int) -> str:
    """Where ``advantage_loader`` keeps the cache of ``loader``'s pairs (``digests``: both teachers')."""
    key = fingerprint(kind="advantages", examples=loader.fingerprint, mask=loader.mask, k=k, **digests)
    return os.path.join(cache_dir, f"advantages-{key}")


def advantage_loader(
    loader: Loader, dpo_teacher: Callable[[], PassFn], reference: Callable[[], PassFn], *, cache_dir: str,
    digests: Mapping[str, Any], k: int, batch_size: int, write: bool, progress: Progress = _no_progress,
) -> Loader:
    """``loader`` (pairs: chosen = the data's answer, rejected = the state) whose sequences carry
    ``candidate_ids [n, k]`` int32 and ``advantages [n, k]`` float32 on the state's scored tokens,
    0 on the chosen sequence, from the cache at ``advantage_cache_path``. When it is absent:
    ``dpo_teacher()`` gives the pass of ``candidate_pass``, which is dropped before
    ``reference()`` gives the pass of ``advantage_pass`` (factories that load their model let
    each be freed before the other is loaded); neither is called when the cache exists."""
    states = _states(loader)

    def compute() -> SideCache:
        candidates = candidate_pass(states, dpo_teacher(), k=k, batch_size=batch_size, progress=progress)
        return advantage_pass(states, candidates, reference(), batch_size=batch_size, progress=progress)

    cache = _load_or_compute(advantage_cache_path(loader, cache_dir=cache_dir, digests=digests, k=k), states,
                             compute, write)
    return _attach(loader, cache, {"candidate_ids": np.int32, "advantages": np.float32}, (None, 0))


def check_vocabulary(*, teacher: str, student: str, teacher_vocab_size: int, student_vocab_size: int,
                     teacher_tokenizer: str, student_tokenizer: str) -> None:
    """``ValueError`` naming both models unless the teacher's vocabulary (model ``vocab_size``
    and tokenizer digest, ``fingerprint.tokenizer_digest``) is the student's: the teacher's
    token ids index the student's softmax."""
    problems = []
    if teacher_vocab_size != student_vocab_size:
        problems.append(f"vocab_size {teacher_vocab_size} vs {student_vocab_size}")
    if teacher_tokenizer != student_tokenizer:
        problems.append(f"tokenizer digest {teacher_tokenizer[:12]} vs {student_tokenizer[:12]}")
    if problems:
        raise ValueError(f"teacher {teacher} and student {student} do not share a vocabulary ({'; '.join(problems)}): "
                         "distillation needs the student's tokenizer and vocabulary size in the teacher")
