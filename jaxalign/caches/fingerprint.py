"""Fingerprints of a cache's inputs: a SHA-256 over everything the cached numbers depend on.

A cache is stored under ``fingerprint(**digests_and_settings)``: change any input (weights,
tokenizer or chat template, data files, tokenized examples, settings) and the key changes, so
a stale cache is never read. The digests here cover parameters, tokenizers and source files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["fingerprint", "host_array", "params_digest", "source_digest", "tokenizer_digest"]


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def host_array(x: jax.Array) -> np.ndarray:
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
        value = host_array(leaf)
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


def fingerprint(**parts: Any) -> str:
    """The cache key (hex, 24 chars) of named digests and settings (JSON-serialisable)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
