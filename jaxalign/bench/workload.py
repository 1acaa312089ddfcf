"""The benchmark's shared workload: one model checkpoint, one tokenizer, one set of pairs.

``build_workload`` writes, under ``workdir``:

* ``model/``: a randomly initialised Llama-family checkpoint in Hugging Face format (our
  ``jaxalign.models.save_pretrained``), with its tokenizer, which jaxalign and TRL both load,
  so both train the same weights;
* ``pairs.jsonl``: standard-format records (``prompt``, ``chosen``, ``rejected`` strings)
  taken from an HH-RLHF file (by default the committed fixture), which both trainers read.

Tokenizer: the byte-level BPE of ``jaxalign.tokenizers.build_bpe_tokenizer`` trained on the
pairs' own text with ``vocab_size = spec.vocab``. A corpus of a few hundred dialogues supports
only a few thousand merges (about 5.4k on the fixture), so the tokenizer is smaller than the
model's vocabulary; the model keeps ``spec.vocab`` rows, so every step does the full
``[hidden, vocab]`` unembedding and softmax (ids past the tokenizer never occur). On the
fixture this BPE gives about 9% more tokens per sequence than the Qwen2.5 tokenizer.

Pairs whose prompt would not leave at least two completion tokens within ``max_length`` are
dropped (TRL drops prompts that fill ``max_length``; jaxalign would cut them from the left),
so that both trainers see the same token sequences: longer completions are cut to
``max_length`` from the right by both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FIXTURE", "ModelSpec", "Workload", "build_workload"]

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hh-rlhf" / "harmless-base-test-200.jsonl.gz"


@dataclass(frozen=True)
class ModelSpec:
    """The benchmarked decoder: a Llama-family model (RMSNorm, RoPE, SwiGLU, untied LM head)."""

    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 0  # 0 = heads (multi-head attention)
    intermediate: int = 0  # 0 = 8/3 * hidden rounded up to a multiple of 64 (Llama's ratio)
    vocab: int = 32000

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelSpec.hidden {self.hidden} must be a multiple of heads {self.heads}")
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise ValueError(f"ModelSpec.kv_heads {self.kv_heads} must divide heads {self.heads}")

    @property
    def intermediate_size(self) -> int:
        return self.intermediate or -(-(8 * self.hidden) // (3 * 64)) * 64

    def model_config(self, *, max_position: int, tokenizer=None):
        """The ``jaxalign.models.ModelConfig`` (special token ids from ``tokenizer`` if given)."""
        from jaxalign.models.tiny import tiny_config

        tokens = {}
        if tokenizer is not None:
            tokens = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        return tiny_config(
            "llama", vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers,
            num_heads=self.heads, num_kv_heads=self.kv_heads or self.heads,
            intermediate_size=self.intermediate_size, max_position=max_position, **tokens,
        )


@dataclass(frozen=True)
class Workload:
    """Where the shared inputs are, and what they hold."""

    model_dir: str
    pairs_file: str
    source: str
    spec: ModelSpec
    max_length: int
    num_pairs: int
    dropped_pairs: int
    tokenizer_size: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "spec": dataclasses.asdict(self.spec)}


def _records(source: str):
    from jaxalign.data import read_records

    records, report = read_records(source, on_bad_record="skip")
    for r in records:
        if not all(isinstance(x, str) for x in (r.prompt, r.chosen, r.rejected)) or r.rejected_prompt is not None:
            raise ValueError(
                f"{r.file}:{r.line}: the benchmark needs text records with one shared prompt "
                f"(got format {r.format!r}); use an HH-RLHF or standard-format file"
            )
    return records, report


def build_workload(
    workdir: str | os.PathLike, spec: ModelSpec, *, max_length: int, source: str | os.PathLike = FIXTURE,
    seed: int = 0,
) -> Workload:
    """Writes (or reuses, when ``workdir/workload.json`` matches) the model and the pairs."""
    from jaxalign import models
    from jaxalign.data import Encoder
    from jaxalign.tokenizers import build_bpe_tokenizer, load_tokenizer

    if max_length < 8:
        raise ValueError(f"max_length must be >= 8, got {max_length}")
    workdir = Path(workdir)
    source = str(source)
    key = {"spec": dataclasses.asdict(spec), "max_length": max_length, "source": os.path.abspath(source),
           "seed": seed, "version": 1}
    meta_path = workdir / "workload.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return Workload(**{**meta["workload"], "spec": spec})
    records, _ = _records(source)
    if not records:
        raise ValueError(f"{source}: no usable preference records")
    corpus = [r.prompt + side for r in records for side in (r.chosen, r.rejected)]
    tok_dir = workdir / "tokenizer"
    build_bpe_tokenizer(tok_dir, vocab_size=spec.vocab, corpus=corpus)
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > spec.vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries, more than the model vocab {spec.vocab}")
    encoder = Encoder(tokenizer)
    kept = [r for r in records if encoder.encode_sequence(r.prompt, r.chosen).prompt_len < max_length - 1]
    if not kept:
        raise ValueError(f"{source}: every prompt is longer than max_length - 2 = {max_length - 2} tokens")
    pairs_file = workdir / "pairs.jsonl"
    with open(pairs_file, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n")
    model = models.make_model(spec.model_config(max_position=max_length, tokenizer=tokenizer), seed=seed)
    models.save_pretrained(model, workdir / "model", tokenizer=tokenizer, overwrite=True)
    workload = Workload(
        model_dir=str(workdir / "model"), pairs_file=str(pairs_file), source=source, spec=spec,
        max_length=max_length, num_pairs=len(kept), dropped_pairs=len(records) - len(kept),
        tokenizer_size=len(tokenizer),
    )
    meta_path.write_text(json.dumps({"key": key, "workload": {**workload.to_dict(), "spec": None}}, indent=2))
    return workload
