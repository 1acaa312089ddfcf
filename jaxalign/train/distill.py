"""The teacher phase of a distillation run (``loss.name`` dckd | adpa), before the student's
train state is built (docs/distillation.md).

* **DCKD**: each pair's chosen and rejected completion tokens get the DPO-aligned teacher's
  top-``distill.top_k`` next-token ids and probabilities (``caches.teacher.teacher_topk_loader``).
* **ADPA**: each pair's rejected response is replaced by the student's own greedy completion of
  the prompt (the state; at most ``distill.max_new_tokens`` tokens, sampled once and cached),
  and the state's tokens get the DPO teacher's top-k candidates and their advantages
  ``log pi_dpo(a|s) - log pi_ref(a|s)`` against ``distill.teacher_reference``
  (``caches.teacher.advantage_loader``); the chosen response stays the data's answer.

Teachers are loaded only when their cache is computed, one at a time, and dropped before the
next model loads: the teacher, its reference and the student's optimizer state are never on the
devices together. A teacher is a Hugging Face checkpoint or a jaxalign run directory (its
export) and must share the student's tokenizer and vocabulary size. The caches are keyed by the
teachers' files (weights and config), the tokenizer, the examples and ``top_k``: another
teacher gets another cache, none is overwritten.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import models, parallel
from jaxalign.caches import teacher as teacher_caches
from jaxalign.caches.fingerprint import fingerprint, params_digest, source_digest, tokenizer_digest
from jaxalign.caches.generations import load_or_sample, sample_completions
from jaxalign.data.encoding import EncodedPair, EncodedSequence
from jaxalign.data.loader import Loader
from jaxalign.scoring.topk import candidate_logps_fn, teacher_topk_fn
from jaxalign.tokenizers import load_tokenizer, stop_ids
from jaxalign.train import build

__all__ = ["attach_teacher_signals", "cache_dir"]

PASS_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask")


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.distill.cache_dir or os.path.join(workdir, "distill_cache")


def _teacher(config: ml_collections.ConfigDict, key: str, student_tokenizer: Any) -> tuple[str, str]:
    """``(checkpoint directory, digest of its files)`` of the teacher named by ``distill.<key>``,
    after checking that it shares the student's vocabulary."""
    path = build.model_dir(getattr(config.distill, key), f"distill.{key}")
    try:
        teacher_vocab = models.load_config(path).vocab_size
        teacher_tokenizer = tokenizer_digest(load_tokenizer(path))
        teacher_caches.check_vocabulary(
            teacher=path, student=config.model.path, teacher_vocab_size=teacher_vocab,
            student_vocab_size=models.load_config(config.model.path).vocab_size,
            teacher_tokenizer=teacher_tokenizer, student_tokenizer=tokenizer_digest(student_tokenizer))
    except (ValueError, OSError, models.CheckpointError, models.UnsupportedModelError) as e:
        raise build.RunError(f"distill.{key}: {e}") from None
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, "config.json")])
    return path, source_digest(files)


def _pass(config: ml_collections.ConfigDict, path: str, mesh: Mesh, make: Callable[[Any], Any],
          extra: tuple[str, ...] = ()) -> Callable[[], Callable[[dict[str, np.ndarray]], Any]]:
    """A factory: loads the model at ``path`` (only when called) and returns the pass
    ``host batch -> make(forward)(params, global batch)``."""

    def load() -> Callable[[dict[str, np.ndarray]], Any]:
        model = build.load_model(config, path, mesh)
        fn = make(build.forward_for(config, model.graphdef, mesh))
        keys = PASS_KEYS + extra
        return lambda host: fn(model.params, parallel.global_batch({k: host[k] for k in keys}, mesh))

    return load


def _states(config: ml_collections.ConfigDict, workdir: str, loader: Loader, tokenizer: Any, policy: build.Model,
            split: str, is_main: bool) -> Loader:
    """``loader`` with each pair's rejected response replaced by the student's greedy completion
    of its prompt (cached under the student's weights, the examples and the length)."""
    prompts = [p.chosen.ids[: p.chosen.prompt_len] for p in loader.examples]
    max_length = config.data.max_length
    key = fingerprint(kind="adpa-states", examples=loader.fingerprint, student=params_digest(policy.params["model"]),
                      max_new_tokens=config.distill.max_new_tokens, max_length=max_length, split=split)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def sample() -> list[np.ndarray]:
        model = nnx.merge(policy.graphdef, policy.params["model"])
        return sample_completions(model, prompts, stop_ids=stop_ids(tokenizer, config.model.path), pad_id=pad,
                                  max_new_tokens=config.distill.max_new_tokens, max_length=max_length,
                                  seed=config.seed, temperature=0.0)

    states = load_or_sample(os.path.join(cache_dir(config, workdir), f"adpa-states-{key}"), sample, write=is_main)
    parallel.barrier(f"adpa-states-{split}")
    pairs = [EncodedPair(p.chosen, EncodedSequence(np.concatenate([prompt, state]).astype(np.int32), len(prompt),
                                                   p.chosen.has_bos), p.index)
             for p, prompt, state in zip(loader.examples, prompts, states, strict=True)]
    return loader.with_examples(pairs)


def attach_teacher_signals(config: ml_collections.ConfigDict, workdir: str, loaders: dict[str, Loader | None],
                           tokenizer: Any, policy: build.Model, mesh: Mesh, is_main: bool,
                           batch_size: Callable[[Loader], int]) -> dict[str, Loader | None]:
    """The train and eval loaders with the distillation loss's side arrays (module docstring);
    ``batch_size(loader)``: pairs per global batch of a teacher pass."""
    from tqdm.auto import tqdm

    d = config.distill
    teacher, teacher_digest = _teacher(config, "teacher", tokenizer)
    digests = {"teacher": teacher_digest, "tokenizer": tokenizer_digest(tokenizer), "dtype": config.model.dtype}
    if config.loss.name == "adpa":
        reference, reference_digest = _teacher(config, "teacher_reference", tokenizer)
        digests["teacher_reference"] = reference_digest

    def progress(passes: Loader, name: str):
        return tqdm(passes, total=passes.batches_in_epoch(0), desc=name, unit="batch", dynamic_ncols=True,
                    disable=not (is_main and config.progress_bar))

    out: dict[str, Loader | None] = {}
    for split, loader in loaders.items():
        if loader is not None:
            common = dict(cache_dir=cache_dir(config, workdir), digests={**digests, "split": split}, k=d.top_k,
                          batch_size=batch_size(loader), write=is_main, progress=progress)
            if config.loss.name == "dckd":
                loader = teacher_caches.teacher_topk_loader(
                    loader, _pass(config, teacher, mesh, lambda f: teacher_topk_fn(f, d.top_k)), **common)
            else:
                loader = _states(config, workdir, loader, tokenizer, policy, split, is_main)
                loader = teacher_caches.advantage_loader(
                    loader, _pass(config, teacher, mesh, lambda f: teacher_topk_fn(f, d.top_k)),
                    _pass(config, reference, mesh, lambda f: candidate_logps_fn(f, "candidate_ids"),
                          extra=("candidate_ids",)), **common)
            parallel.barrier(f"distill-{split}")
        out[split] = loader
    return out
