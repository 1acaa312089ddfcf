"""Tiny randomly initialised HF checkpoints (plus a tokenizer) for tests and the quickstart.

``write_tiny_checkpoint(out_dir, family="llama")`` writes a loadable checkpoint directory of a
few hundred thousand parameters. The tokenizer is the small trained byte-level BPE
(``"bpe"``, default; trained on ``corpus``, or the committed HH-RLHF fixture) or the real
Qwen2.5 vocabulary (``"qwen"``: a 151k-row embedding) from ``jaxalign.tokenizers``; the
model's vocabulary covers it, rounded up to a multiple of 64. ``ensure_tiny_checkpoint`` writes
one only where none is (the trainer's ``model.create_if_missing``). Nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from jaxalign.models.build import make_model
from jaxalign.models.config import FAMILIES, ModelConfig, RopeScaling
from jaxalign.models.hf_export import save_pretrained

TOKENIZERS = ("bpe", "qwen")


def tiny_config(
    family: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position: int = 512,
    rope_scaling: str | None = None,
    attention_bias: bool = False,
    tie_embeddings: bool = False,
    sliding_window: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> ModelConfig:
    """A small ``ModelConfig`` of ``family``.

    ``num_kv_heads`` defaults to ``num_heads // 2`` (grouped-query attention) for the Llama
    family and must equal ``num_heads`` for GPT-2. ``rope_scaling``: ``None``, ``"linear"``
    (factor 2) or ``"llama3"`` (factor 8, low/high frequency factors 1/4, original context
    ``max_position // 4``). ``attention_bias`` is for ``llama`` only (``qwen2`` always has q/k/v
    biases, ``gpt2`` all biases, ``mistral`` none); ``sliding_window`` for ``mistral`` only.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    gpt2 = family == "gpt2"
    scaling = None
    if rope_scaling == "linear":
        scaling = RopeScaling("linear", 2.0)
    elif rope_scaling == "llama3":
        scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, max(max_position // 4, 1))
    elif rope_scaling is not None:
        raise ValueError(f"rope_scaling must be None, 'linear' or 'llama3', got {rope_scaling!r}")
    if attention_bias and family != "llama":
        raise ValueError(f"attention_bias is fixed by the {family!r} family; only 'llama' makes it optional")
    bias = {"llama": (attention_bias, attention_bias, False), "qwen2": (True, False, False),
            "mistral": (False, False, False), "gpt2": (True, True, True)}[family]
    return ModelConfig(
        family=family, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads or (num_heads if gpt2 else max(num_heads // 2, 1)),
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size or (4 if gpt2 else 2) * hidden_size,
        max_position=max_position, norm_eps=1e-5 if gpt2 else 1e-6,
        activation="gelu_new" if gpt2 else "silu", rope_scaling=scaling,
        attention_bias=bias[0], attention_out_bias=bias[1], mlp_bias=bias[2],
        tie_embeddings=tie_embeddings, sliding_window=sliding_window,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def build_tokenizer(kind: str, *, bpe_vocab_size: int = 1024, corpus: Iterable[str] | None = None):
    """A ``transformers`` tokenizer built locally: ``"bpe"`` (small BPE trained on ``corpus``,
    default the HH-RLHF fixture) or ``"qwen"``."""
    from jaxalign import tokenizers

    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "bpe":
            tokenizers.build_bpe_tokenizer(tmp, vocab_size=bpe_vocab_size, corpus=corpus)
        else:
            tokenizers.build_qwen_tokenizer(tmp)
        return tokenizers.load_tokenizer(tmp)


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    family: str = "llama",
    tokenizer: str | None = "bpe",
    vocab_size: int | None = None,
    bpe_vocab_size: int = 1024,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **config_options,
) -> Path:
    """Write a random ``family`` checkpoint (config.json, model.safetensors, tokenizer) to ``out_dir``.

    With ``tokenizer=None`` no tokenizer is written and ``vocab_size`` is required;
    ``bpe_vocab_size`` and ``corpus`` train the ``"bpe"`` tokenizer; ``config_options`` go to
    ``tiny_config``. Returns ``out_dir``.
    """
    tok = None
    tokens: dict[str, int | None] = {}
    if tokenizer is not None:
        tok = build_tokenizer(tokenizer, bpe_vocab_size=bpe_vocab_size, corpus=corpus)
        needed = round_up(len(tok))
        if vocab_size is not None and vocab_size < len(tok):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the {tokenizer!r} tokenizer ({len(tok)} tokens)")
        vocab_size = vocab_size or needed
        tokens = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif vocab_size is None:
        raise ValueError("write_tiny_checkpoint without a tokenizer needs vocab_size")
    config = tiny_config(family, vocab_size=vocab_size, **tokens, **config_options)
    model = make_model(config, seed=seed)
    return save_pretrained(model, out_dir, tokenizer=tok, overwrite=overwrite)


def ensure_tiny_checkpoint(out_dir: str | os.PathLike, **options) -> bool:
    """``write_tiny_checkpoint(out_dir, **options)`` unless ``out_dir`` already holds a
    ``config.json``; True when it wrote one. The checkpoint is written beside ``out_dir`` and
    renamed into place, so a killed write never leaves a half model there. ``FileExistsError``
    when ``out_dir`` holds other files."""
    path = Path(out_dir)
    if (path / "config.json").is_file():
        return False
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists but holds no config.json; refusing to write a tiny model into it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = write_tiny_checkpoint(Path(tmp) / "model", **options)
        if path.exists():
            path.rmdir()
        os.replace(staged, path)
    return True
