"""Writing our decoder as a Hugging Face checkpoint that ``transformers`` (and vLLM etc.) load.

Output: ``config.json`` (with ``architectures``), ``model.safetensors`` or, above
``max_shard_size``, ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json``, and the tokenizer files when a tokenizer is given. Tensors
are gathered to the host one shard at a time (stacked layers: one layer's slice at a time). In a multi-process run every process must call
``save_pretrained`` (gathering is collective); only process 0 writes.

With ``reward_head`` (a reward model's kernel ``[D]``) the checkpoint is the family's
``*ForSequenceClassification`` with ``num_labels=1``: no ``lm_head``, ``score.weight [1, D]``,
and a pad token id that is no EOS id (``hf_reward``), so that
``transformers.AutoModelForSequenceClassification`` scores what our head does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import to_hf_config
from jaxalign.models.hf_import import INDEX_FILE, SINGLE_FILE
from jaxalign.models.hf_names import SCORE_PATH, reward_mappings, tensor_mappings
from jaxalign.models.hf_reward import reward_hf_config, reward_pad_token
from jaxalign.models.safetensors_io import save_file
from jaxalign.models.stacked import stacked_path

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"``, ``"200MB"``, ``"64KiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 200MB or 1048576")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each under ``limit`` bytes (a bigger tensor alone)."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > limit:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def _check_destination(path: Path, overwrite: bool):
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    existing = [p.name for p in path.iterdir()
                if p.name in ("config.json", SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(p.name)]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({sorted(existing)}); pass overwrite=True to replace it")
    for name in existing:
        if name != "config.json":
            (path / name).unlink()


def save_pretrained(model: CausalLM, path: str | os.PathLike, *, tokenizer=None,
                    max_shard_size: int | str = "5GB", dtype=None, overwrite: bool = False,
                    reward_head: jax.Array | np.ndarray | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``path`` as an HF checkpoint; returns ``path``.

    ``dtype`` (default: the parameters' dtype) is the dtype tensors are stored in. An existing
    checkpoint in ``path`` is only replaced with ``overwrite=True`` (stale shards are removed).
    ``reward_head`` (kernel ``[D]``) writes a reward model: see the module docstring.
    """
    cfg = model.config
    if reward_head is not None and tuple(reward_head.shape) != (cfg.hidden_size,):
        raise ValueError(f"reward_head has shape {tuple(reward_head.shape)}; expected ({cfg.hidden_size},), "
                         "the kernel of a bias-free scalar head")
    path = Path(path)
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}")
    limit = parse_size(max_shard_size)
    writer = jax.process_index() == 0
    if writer:
        _check_destination(path, overwrite)
        path.mkdir(parents=True, exist_ok=True)
    store_dtype = np.dtype(cfg.param_dtype if dtype is None else dtype)
    params = {key: var[...] for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if reward_head is None:
        mappings, hf_config = tensor_mappings(cfg), to_hf_config(cfg)
    else:
        tokenizer, pad_token_id = reward_pad_token(tokenizer, cfg)
        mappings, hf_config = reward_mappings(cfg), reward_hf_config(cfg, pad_token_id)
        params[SCORE_PATH] = reward_head
    sizes = [int(np.prod(m.hf_shape)) * store_dtype.itemsize for m in mappings]
    shards = _plan_shards(sizes, limit)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, members in zip(names, shards, strict=True):
        tensors = {}
        for i in members:
            m = mappings[i]
            key, layer = stacked_path(m.path) if cfg.scan_layers else (m.path, None)
            value = params[key] if layer is None else params[key][layer]
            tensors[m.hf_name] = m.to_hf(_to_host(value).astype(store_dtype))
            weight_map[m.hf_name] = name
        if writer:
            save_file(tensors, path / name, metadata={"format": "pt"})
    if not writer:
        return path
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    hf_config.dtype = store_dtype.name
    hf_config.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
