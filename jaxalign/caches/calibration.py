"""VPO calibration samples drawn from the reference model, cached on disk.

With ``loss.vpo_calibration = "reference_samples"`` VPO's value regulariser is evaluated on
``y_cal ~ pi_ref(. | x)``: one response per training (and held-out) prompt, sampled once before
training from the reference model (temperature 1, at most ``loss.vpo_max_new_tokens`` tokens,
stopping at EOS) with ``jaxalign.caches.generations``. Each example then carries a third
sequence, prompt + sample (``CalibratedPair``); the data pipeline batches it like the other
two, so its sequence id is ``2P + p`` and the step sums its log-probs like any completion.

Samples are stored in ``CACHE_DIR/calibration-<fingerprint>/`` (an ``ArrayStore``), keyed by
the reference weights, the tokenizer, the tokenized examples, the sampling settings and the
seed (``calibrated_loader``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.caches.fingerprint import fingerprint
from jaxalign.caches.generations import load_or_sample, sample_completions
from jaxalign.data.encoding import EncodedPair, EncodedSequence
from jaxalign.data.loader import Loader

__all__ = ["CalibratedPair", "attach_samples", "calibrated_loader"]


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
        return sample_completions(model, [_prompt(p) for p in loader.examples], stop_ids=(eos_id,), pad_id=pad_id,
                                  max_new_tokens=max_new_tokens, max_length=max_length, seed=seed)

    samples = load_or_sample(os.path.join(cache_dir, f"calibration-{key}"), sample, write=write)
    return loader.with_examples(attach_samples(loader.examples, samples))
