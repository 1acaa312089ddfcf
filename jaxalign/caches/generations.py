"""Completions sampled once per example from a frozen model, cached on disk.

VPO's calibration responses (``jaxalign.caches.calibration``: one sample of the reference per
prompt) and ADPA's states (``jaxalign.caches.states``: the student's greedy completion of each
prompt) are both "one completion per example, drawn before training": ``sample_completions``
draws them with ``jaxalign.sampling.sample`` (example ``i`` seeded by ``(seed, i)``) and
``load_or_sample`` keeps them in an ``ArrayStore``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxalign.data.batching import bucket_ladder
from jaxalign.data.store import ArrayStore
from jaxalign.sampling import SamplingConfig, sample

__all__ = ["load_or_sample", "sample_completions"]


def sample_completions(
    model: Any, prompts: Sequence[np.ndarray], *, stop_ids: tuple[int, ...], pad_id: int, max_new_tokens: int,
    max_length: int, seed: int, temperature: float = 1.0, batch_size: int = 16,
) -> list[np.ndarray]:
    """One completion (int32 ids, the stop token included when emitted) per prompt, at
    ``temperature`` (0: greedy), each cut so that prompt + completion fits ``max_length``."""
    graphdef, params = nnx.split(model)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_ids=stop_ids,
                            pad_id=pad_id, batch_size=batch_size, buckets=bucket_ladder(max_length))
    out = sample(graphdef, params, list(prompts), config)
    return [out.tokens[i, 0][out.mask[i, 0] == 1][: max(max_length - len(prompt), 1)].astype(np.int32)
            for i, prompt in enumerate(prompts)]


def load_or_sample(path: str, sample_fn: Callable[[], list[np.ndarray]], *, write: bool) -> list[np.ndarray]:
    """The completions stored at ``path``, or ``sample_fn()`` saved there (``write``: process 0)."""
    store = ArrayStore(path)
    if store.exists():
        arrays = store.read()
        return np.split(np.asarray(arrays["tokens"]), np.asarray(arrays["offsets"])[1:-1])
    samples = sample_fn()
    if write:
        offsets = np.cumsum([0] + [len(s) for s in samples])
        store.write({"tokens": np.concatenate(samples).astype(np.int32), "offsets": offsets})
    return samples
