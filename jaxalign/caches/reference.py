"""Precomputed reference log-probs, cached on disk and keyed by a fingerprint of their inputs.

With ``reference.mode = "precomputed"`` the reference model runs once over every training
and held-out example before training; its per-sequence log-prob sums (chosen, rejected) are
stored in ``CACHE_DIR/<fingerprint>/`` (an ``ArrayStore``: read memory-mapped) and looked up by
each batch's ``example_index``. The pass (``build_reference_cache``) is one unshuffled epoch
in the training layout (packed rows with ``data.packing``, else padded buckets, sorted by
length), ``batch_size`` pairs per batch; it covers every example exactly once
(``check_coverage``). A sequence's log-prob does not depend on the layout or the batch it is
computed in (beyond float rounding), so neither is part of the fingerprint.

The fingerprint (``jaxalign.caches.fingerprint``) covers everything the numbers depend on:
the reference weights, the tokenizer and its chat template, the truncation and masking
settings and the compute dtype, the data (the source files' content and the tokenized
examples). Any change gives a new fingerprint, hence a new cache: a stale cache is never used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from jaxalign import parallel
from jaxalign.caches.fingerprint import fingerprint, host_array
from jaxalign.data.loader import Loader
from jaxalign.data.store import ArrayStore

__all__ = [
    "CoverageError",
    "ReferenceCache",
    "build_reference_cache",
    "cache_loader",
    "check_coverage",
    "compute_cache",
    "load_or_compute",
]


@dataclass(frozen=True)
class ReferenceCache:
    """Reference log-prob sums per example: ``indices [N]`` (example_index), ``chosen``,
    ``rejected`` and, for VPO reference samples, ``calibration`` (else None). Loaded caches
    hold memory-mapped arrays."""

    indices: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    calibration: np.ndarray | None = None
    _order: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_order", np.argsort(np.asarray(self.indices), kind="stable"))

    def lookup(self, example_index: np.ndarray) -> dict[str, np.ndarray]:
        """``{"ref_chosen_logps", "ref_rejected_logps"[, "ref_calibration_logps"]}`` (float32,
        shaped like ``example_index``); 0 for filler slots (index -1). ``KeyError`` naming the
        index when one is not cached."""
        example_index = np.asarray(example_index)
        order = self._order
        sorted_idx = np.asarray(self.indices)[order]
        flat = example_index.reshape(-1)
        pos = np.searchsorted(sorted_idx, flat)
        pos_clipped = np.minimum(pos, len(sorted_idx) - 1)
        found = (flat < 0) | (sorted_idx[pos_clipped] == flat)
        if not found.all():
            missing = flat[~found][:5].tolist()
            raise KeyError(f"reference cache has no entry for example_index {missing}")
        real = flat >= 0
        rows = order[pos_clipped]
        columns = {"ref_chosen_logps": self.chosen, "ref_rejected_logps": self.rejected}
        if self.calibration is not None:
            columns["ref_calibration_logps"] = self.calibration
        return {
            key: np.where(real, values[rows], 0.0).astype(np.float32).reshape(example_index.shape)
            for key, values in columns.items()
        }

    def save(self, path: str) -> None:
        """Writes the cache as an ``ArrayStore`` directory at ``path`` (atomically)."""
        extra = {} if self.calibration is None else {"calibration": self.calibration}
        ArrayStore(path).write({"indices": self.indices, "chosen": self.chosen, "rejected": self.rejected, **extra})

    @classmethod
    def load(cls, path: str) -> ReferenceCache:
        """The cache stored at ``path``, memory-mapped."""
        arrays = ArrayStore(path).read()
        return cls(indices=arrays["indices"], chosen=arrays["chosen"], rejected=arrays["rejected"],
                   calibration=arrays.get("calibration"))


def compute_cache(
    batches: Iterable[dict[str, np.ndarray]],
    reference_sums: Callable[[dict[str, np.ndarray]], jax.Array],
) -> ReferenceCache:
    """Runs ``reference_sums`` (batch -> sums ``[2P]``, or ``[3P]`` with calibration sequences,
    global) over ``batches`` (this process's shard of each global batch) and collects the sums
    per ``example_index``. Batches may be in any layout (padded or packed) and any order: the
    sums are keyed by ``example_index`` alone. The next batch is dispatched before the previous
    one's sums are copied to the host, so that building host batches overlaps the device work."""
    indices, chosen, rejected, calibration = [], [], [], []

    def collect(sums_device: jax.Array, index: np.ndarray) -> None:
        sums = host_array(sums_device).astype(np.float64)
        p = index.shape[0]
        real = index >= 0
        indices.append(index[real])
        chosen.append(sums[:p][real])
        rejected.append(sums[p : 2 * p][real])
        if sums.shape[0] == 3 * p:
            calibration.append(sums[2 * p : 3 * p][real])

    pending = None
    for batch in batches:
        sums = reference_sums(batch)
        index = parallel.gathered_rows(np.asarray(batch["example_index"]))
        if pending is not None:
            collect(*pending)
        pending = (sums, index)
    if pending is None:
        raise ValueError("the reference cache pass yielded no batches")
    collect(*pending)
    return ReferenceCache(
        indices=np.concatenate(indices).astype(np.int64),
        chosen=np.concatenate(chosen).astype(np.float32),
        rejected=np.concatenate(rejected).astype(np.float32),
        calibration=np.concatenate(calibration).astype(np.float32) if calibration else None,
    )


class CoverageError(ValueError):
    """A reference cache does not hold each example of its split exactly once."""


def check_coverage(cache: ReferenceCache, expected: np.ndarray, where: str) -> None:
    """``CoverageError`` (naming ``where``) unless ``cache`` holds each ``expected`` example_index
    exactly once and nothing else: a missing example must never read as a log-prob of 0."""
    expected = np.unique(np.asarray(expected, np.int64))
    held, counts = np.unique(cache.indices, return_counts=True)
    problems = []
    missing = np.setdiff1d(expected, held)
    if missing.size:
        problems.append(f"{missing.size} example(s) missing (example_index {missing[:5].tolist()})")
    repeated = held[counts > 1]
    if repeated.size:
        problems.append(f"{repeated.size} example(s) cached more than once (example_index {repeated[:5].tolist()})")
    extra = np.setdiff1d(held, expected)
    if extra.size:
        problems.append(f"{extra.size} unknown example(s) (example_index {extra[:5].tolist()})")
    if problems:
        raise CoverageError(f"reference cache {where}: " + "; ".join(problems))


def load_or_compute(
    cache_dir: str, key: str, compute: Callable[[], ReferenceCache], *, write: bool = True,
    expected: np.ndarray | None = None,
) -> tuple[ReferenceCache, bool]:
    """``(cache, computed)``: the cache stored under ``key``, computed and saved if absent.

    ``write`` (process 0 only in multi-process runs) saves a computed cache. ``expected``: the
    example indices the cache must cover exactly once (``check_coverage``), checked on the
    loaded or computed cache before it is used or saved.
    """
    path = os.path.join(cache_dir, key)
    if ArrayStore(path).exists():
        cache = ReferenceCache.load(path)
        if expected is not None:
            check_coverage(cache, expected, f"{path} (delete the directory to recompute it)")
        return cache, False
    cache = compute()
    if expected is not None:
        check_coverage(cache, expected, f"computed for {path}")
    if write:
        cache.save(path)
    return cache, True


def cache_loader(loader: Loader, batch_size: int) -> Loader:
    """One unshuffled pass over a loader's examples in its layout, ``batch_size`` pairs per batch.

    Packed (``loader.packing``): rows of the loader's ``pack_length``, at most as many as the
    loader's rule gives for ``batch_size`` pairs (``Loader.default_pack_rows``, in multiples of
    the loader's ``row_multiple`` so that the rows split over the mesh). Padded: the examples
    sorted by length, so that each batch pads to the smallest bucket that fits similar
    lengths. The order does not matter: the sums are keyed by ``example_index``.
    """
    examples = loader.examples
    if not loader.packing:
        examples = sorted(examples, key=lambda e: max(len(s) for s in e.sequences))
    return loader.with_examples(examples, batch_size=batch_size, shuffle=False, num_epochs=1)


def build_reference_cache(
    loader: Loader, *, sums: Callable[[dict[str, np.ndarray]], jax.Array], cache_dir: str,
    digests: Mapping[str, Any], batch_size: int, write: bool, progress: Callable[[Loader], Iterable] = iter,
) -> ReferenceCache:
    """The reference cache of ``loader``'s examples: loaded from ``cache_dir`` when its key
    (``digests`` plus the examples' fingerprint) is there, else computed with ``sums`` (a host
    batch of this process -> global sums ``[S]``) over ``cache_loader(loader, batch_size)``,
    wrapped by ``progress`` (e.g. a progress bar), and saved (``write``: process 0).
    ``CoverageError`` unless it holds each of the loader's examples exactly once."""
    key = fingerprint(examples=loader.fingerprint, **digests)

    def compute() -> ReferenceCache:
        return compute_cache(progress(cache_loader(loader, batch_size)), sums)

    expected = np.asarray([e.index for e in loader.examples], np.int64)
    return load_or_compute(cache_dir, key, compute, write=write, expected=expected)[0]
