"""Writes a tiny randomly initialised HF checkpoint plus tokenizer, for the quickstart and tests.

``ensure_tiny_model(path, spec, ...)`` does nothing when ``path`` already holds a
``config.json``; otherwise it trains the small byte-level BPE of ``jaxalign.tokenizers`` (on
``corpus``, or the committed HH-RLHF fixture by default), builds a decoder of the
``model.tiny`` config group (``jaxalign.models.tiny.tiny_config``, ``make_model``) and exports both with
``jaxalign.models.save_pretrained``. Nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import ml_collections

from jaxalign import models
from jaxalign.models.tiny import round_up, tiny_config
from jaxalign.tokenizers import build_bpe_tokenizer, load_tokenizer

__all__ = ["ensure_tiny_model", "tiny_model_config"]


def tiny_model_config(spec: ml_collections.ConfigDict, tokenizer, max_position: int) -> models.ModelConfig:
    """The ``ModelConfig`` of the ``model.tiny`` spec (``jaxalign.models.tiny.tiny_config``);
    the vocabulary covers ``tokenizer``, rounded up to a multiple of 64."""
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"model.tiny.hidden_size {spec.hidden_size} must be a multiple of num_heads {spec.num_heads}")
    return tiny_config(
        spec.family,
        vocab_size=round_up(len(tokenizer)),
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_heads if spec.family == "gpt2" else spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position=max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def ensure_tiny_model(
    path: str | os.PathLike,
    spec: ml_collections.ConfigDict,
    *,
    max_position: int,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> bool:
    """Creates the tiny model at ``path`` unless it exists; True when it was created."""
    path = Path(path)
    if (path / "config.json").is_file():
        return False
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists but holds no config.json; refusing to write a tiny model into it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        build_bpe_tokenizer(tok_dir, vocab_size=spec.vocab_size, corpus=corpus)
        tokenizer = load_tokenizer(tok_dir)
        model = models.make_model(tiny_model_config(spec, tokenizer, max_position), seed=seed)
        staged = Path(tmp) / "model"
        models.save_pretrained(model, staged, tokenizer=tokenizer)
        if path.exists():
            path.rmdir()
        os.replace(staged, path)
    return True
