"""Precomputed reference log-probs, cached on disk and keyed by a fingerprint of their inputs.

With ``reference.mode = "precomputed"`` the reference model runs once over every training
and held-out example before training; its per-sequence log-prob sums (chosen, rejected) are
stored in ``CACHE_DIR/<fingerprint>.npz`` and looked up by each batch's ``example_index``.
The pass is one unshuffled epoch in the training layout (packed rows with ``data.packing``,
else padded buckets), ``reference.cache_batch_size`` pairs per batch; it covers every example
exactly once (``check_coverage``). A sequence's log-prob does not depend on the layout or the
batch it is computed in (beyond float rounding), so neither is part of the fingerprint.

The fingerprint is a SHA-256 over everything the numbers depend on:

* the reference weights (a digest of every parameter array: its path, dtype, shape, bytes);
* the tokenizer (vocabulary, merges, normaliser and pre-tokeniser as serialised by the
  ``tokenizers`` backend, special tokens) and its chat template;
* the truncation and masking settings (``max_length``, ``max_prompt_length``, mask mode) and
  the compute dtype;
* the data: the source files (path, size, SHA-256 of the content) and the fingerprint of the
  tokenized examples.

Any change gives a new fingerprint, hence a new cache file: a stale cache is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = [
    "CoverageError",
    "ReferenceCache",
    "check_coverage",
    "compute_cache",
    "load_or_compute",
    "params_digest",
    "reference_fingerprint",
    "source_digest",
    "tokenizer_digest",
]


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _host_array(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def params_digest(params: Any) -> str:
    """SHA-256 of a parameter pytree (``nnx.State`` or nested dict): paths, dtypes, shapes, bytes."""
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    parts = []
    for path, leaf in leaves:
        value = _host_array(leaf)
        parts += [jax.tree_util.keystr(path).encode(), str(value.dtype).encode(), str(value.shape).encode()]
        parts.append(np.ascontiguousarray(value).tobytes())
    return _sha(parts)


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of a Hugging Face tokenizer's vocabulary, merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialised = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(
        {
            "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
            "added": sorted(str(t) for t in tokenizer.all_special_tokens),
        },
        sort_keys=True,
    )
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return _sha([serialised.encode(), special.encode(), template.encode()])


def source_digest(files: Iterable[str]) -> str:
    """SHA-256 over the named files: path, size and content (``tfds:`` items by name only)."""
    parts = []
    for item in files:
        parts.append(item.encode())
        if item.startswith("tfds:") or not os.path.isfile(item):
            continue
        h = hashlib.sha256()
        with open(item, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        parts += [str(os.path.getsize(item)).encode(), h.hexdigest().encode()]
    return _sha(parts)


def reference_fingerprint(
    *, params: str, tokenizer: str, data: str, examples: str, settings: Mapping[str, Any]
) -> str:
    """The cache key (hex, 24 chars) from the component digests and the settings."""
    blob = json.dumps(
        {"params": params, "tokenizer": tokenizer, "data": data, "examples": examples, "settings": dict(settings)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ReferenceCache:
    """Reference log-prob sums per example: ``indices [N]`` (example_index), ``chosen``,
    ``rejected`` and, for VPO reference samples, ``calibration`` (else None)."""

    indices: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    calibration: np.ndarray | None = None

    def lookup(self, example_index: np.ndarray) -> dict[str, np.ndarray]:
        """``{"ref_chosen_logps", "ref_rejected_logps"[, "ref_calibration_logps"]}`` (float32,
        shaped like ``example_index``); 0 for filler slots (index -1). ``KeyError`` naming the
        index when one is not cached."""
        example_index = np.asarray(example_index)
        order = np.argsort(self.indices, kind="stable")
        sorted_idx = self.indices[order]
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
        tmp = f"{path}.tmp{os.getpid()}.npz"
        extra = {} if self.calibration is None else {"calibration": self.calibration}
        np.savez(tmp, indices=self.indices, chosen=self.chosen, rejected=self.rejected, **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> ReferenceCache:
        with np.load(path) as f:
            calibration = f["calibration"] if "calibration" in f.files else None
            return cls(indices=f["indices"], chosen=f["chosen"], rejected=f["rejected"], calibration=calibration)


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
        sums = _host_array(sums_device).astype(np.float64)
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
        local = np.asarray(batch["example_index"])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            index = np.asarray(multihost_utils.process_allgather(local, tiled=True))
        else:
            index = local
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
    cache_dir: str, fingerprint: str, compute: Callable[[], ReferenceCache], *, write: bool = True,
    expected: np.ndarray | None = None,
) -> tuple[ReferenceCache, bool]:
    """``(cache, computed)``: the cache stored under ``fingerprint``, computed and saved if absent.

    ``write`` (process 0 only in multi-process runs) saves a computed cache. ``expected``: the
    example indices the cache must cover exactly once (``check_coverage``), checked on the
    loaded or computed cache before it is used or saved.
    """
    path = os.path.join(cache_dir, f"{fingerprint}.npz")
    if os.path.exists(path):
        cache = ReferenceCache.load(path)
        if expected is not None:
            check_coverage(cache, expected, f"{path} (delete the file to recompute it)")
        return cache, False
    cache = compute()
    if expected is not None:
        check_coverage(cache, expected, f"computed for {path}")
    if write:
        os.makedirs(cache_dir, exist_ok=True)
        cache.save(path)
    return cache, True
