"""VPO calibration samples drawn from the reference model, cached on disk.

With ``loss.vpo_calibration = "reference_samples"`` VPO's value regulariser is evaluated on
``y_cal ~ pi_ref(. | x)``: one response per training (and held-out) prompt, sampled once before
training from the reference model (temperature 1, at most ``loss.vpo_max_new_tokens`` tokens,
stopping at EOS) with ``jaxalign.sampling.sample``. Each example then carries a third
sequence, prompt + sample (``CalibratedPair``); the data pipeline batches it like the other
two, so its sequence id is ``2P + p`` and the step sums its log-probs like any completion.

Samples are stored in ``CACHE_DIR/calibration-<fingerprint>/`` (an ``ArrayStore``), keyed by
the reference weights, the tokenizer, the tokenized examples, the sampling settings and the
seed (``calibrated_loader``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxalign.caches.fingerprint import fingerprint
from jaxalign.caches.store import ArrayStore
from jaxalign.data.batching import bucket_ladder
from jaxalign.data.encoding import EncodedPair, EncodedSequence
from jaxalign.data.loader import Loader
from jaxalign.sampling import SamplingConfig, sample

__all__ = ["CalibratedPair", "attach_samples", "calibrated_loader", "load_or_sample", "sample_calibration"]


@dataclasses.dataclass(frozen=True)
class CalibratedPair:
    """A preference pair plus one calibration sequence (the chosen side's prompt + a sample)."""

    chosen: EncodedSequence
    rejected: EncodedSequence
    calibration: EncodedSequence
    index: int

    @property
    def sequences(self) -> tuple[EncodedSequence, EncodedSequence, EncodedSequence]:
        return (self.chosen, self.rejected, self.calibration)


def _prompt(pair: EncodedPair) -> np.ndarray:
    return pair.chosen.ids[: pair.chosen.prompt_len]


def sample_calibration(
    model: Any,
    pairs: Sequence[EncodedPair],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    max_length: int,
    seed: int,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """One sampled completion (int32 ids, EOS included when emitted) per pair's chosen prompt,
    at temperature 1 (``jaxalign.sampling.sample``: pair ``i``'s sample is seeded by ``(seed,
    i)``). A completion is cut so that prompt + completion fits ``max_length``."""
    graphdef, params = nnx.split(model)
    prompts = [_prompt(p) for p in pairs]
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, stop_ids=(eos_id,),
                            pad_id=pad_id, batch_size=batch_size, buckets=bucket_ladder(max_length))
    out = sample(graphdef, params, prompts, config)
    return [out.tokens[i, 0][out.mask[i, 0] == 1][: max(max_length - len(prompt), 1)].astype(np.int32)
            for i, prompt in enumerate(prompts)]


def attach_samples(pairs: Sequence[EncodedPair], samples: Sequence[np.ndarray]) -> list[CalibratedPair]:
    """``CalibratedPair``s: each pair with the sequence chosen-prompt + its sample."""
    out = []
    for pair, sample in zip(pairs, samples, strict=True):
        prompt = _prompt(pair)
        calibration = EncodedSequence(
            ids=np.concatenate([prompt, sample]).astype(np.int32), prompt_len=len(prompt), has_bos=pair.chosen.has_bos
        )
        out.append(CalibratedPair(pair.chosen, pair.rejected, calibration, pair.index))
    return out


def load_or_sample(path: str, sample: Callable[[], list[np.ndarray]], *, write: bool) -> list[np.ndarray]:
    """The samples stored at ``path``, or ``sample()`` saved there (``write`` on process 0)."""
    store = ArrayStore(path)
    if store.exists():
        arrays = store.read()
        return np.split(np.asarray(arrays["tokens"]), np.asarray(arrays["offsets"])[1:-1])
    samples = sample()
    if write:
        offsets = np.cumsum([0] + [len(s) for s in samples])
        store.write({"tokens": np.concatenate(samples).astype(np.int32), "offsets": offsets})
    return samples


def calibrated_loader(
    loader: Loader, model: Any, *, cache_dir: str, digests: Mapping[str, Any], eos_id: int, pad_id: int,
    max_new_tokens: int, max_length: int, seed: int, write: bool,
) -> Loader:
    """``loader`` with each pair's calibration sequence attached: samples from ``model`` (the
    reference), cached in ``cache_dir`` under ``digests`` + the sampling settings + the
    examples' fingerprint."""
    key = fingerprint(examples=loader.fingerprint, max_new_tokens=max_new_tokens, max_length=max_length, seed=seed,
                      **digests)

    def sample() -> list[np.ndarray]:
        return sample_calibration(model, loader.examples, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                                  max_length=max_length, seed=seed)

    samples = load_or_sample(os.path.join(cache_dir, f"calibration-{key}"), sample, write=write)
    return loader.with_examples(attach_samples(loader.examples, samples))
