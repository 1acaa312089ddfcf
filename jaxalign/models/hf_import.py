"""Loading a local Hugging Face checkpoint directory into our decoder, without torch.

1. ``config.json`` -> ``transformers.AutoConfig`` (local files only) -> ``ModelConfig``.
2. The decoder is built abstractly (``nnx.eval_shape``: shapes and logical axes, no memory).
3. Each parameter's HF tensor is read lazily from ``model.safetensors`` or the shards listed in
   ``model.safetensors.index.json``, transposed/reshaped to our layout, cast to
   ``param_dtype`` and placed with ``sharding_fn(logical_axes, shape)``: each device receives
   only its shard, read straight from the memory-mapped file. With stacked layers
   (``scan_layers``) a parameter ``[layers, ...]`` is assembled the same way, each device's
   shard from the slices of the layers' tensors it holds: no host ever holds a whole stack.

A sequence-classification checkpoint (``architectures`` = ``*ForSequenceClassification``, e.g.
a reward model) holds the backbone under the causal LM's names and no ``lm_head``: it loads as
a decoder whose LM head is tied to the embedding (``tie_embeddings=True``; only its hidden
states mean anything). Its ``score.weight`` is read by ``hf_reward.load_reward_model``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.build import abstract_model
from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import FAMILIES, ModelConfig, from_hf_config, resolve_scan_layers
from jaxalign.models.errors import CheckpointError, UnsupportedModelError
from jaxalign.models.hf_names import SCORE_NAME, TensorMapping, is_sequence_classifier, tensor_mappings
from jaxalign.models.safetensors_io import SafetensorsFile
from jaxalign.models.stacked import is_stacked, layer_paths

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ShardingFn = Callable[[tuple[str | None, ...], tuple[int, ...]], jax.sharding.Sharding]

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: str = "none", scan_layers: bool | None = None) -> ModelConfig:
    """``ModelConfig`` of the checkpoint directory ``path`` (its ``config.json``); tied
    embeddings for a sequence-classification checkpoint (it has no ``lm_head``).
    ``scan_layers=None``: stacked layers for models of at least ``SCAN_MIN_LAYERS`` layers."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{config_file}: model_type={model_type!r} (architectures={raw.get('architectures')}) is not "
            f"supported; supported model types: {FAMILIES}"
        )
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    config = from_hf_config(hf, dtype=dtype, param_dtype=param_dtype, remat=remat, source=str(config_file))
    config = config.replace(scan_layers=resolve_scan_layers(scan_layers, config.num_layers))
    return config.replace(tie_embeddings=True) if is_sequence_classifier(raw.get("architectures")) else config


class CheckpointTensors:
    """Name -> file lookup over a directory's single or sharded safetensors weights."""

    def __init__(self, path: Path):
        self.root = path
        index, single = path / INDEX_FILE, path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt safetensors index ({e!r})") from e
            self.weight_map = {name: path / file for name, file in weight_map.items()}
            self.source = index
        elif single.is_file():
            self.weight_map = None
            self.source = single
        else:
            present = sorted(p.name for p in path.iterdir())
            raise CheckpointError(
                f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE} (found: {present}); "
                "only safetensors weights are supported"
            )
        self._files: dict[Path, SafetensorsFile] = {}
        if self.weight_map is None:
            self._files[single] = SafetensorsFile(single)

    def _file(self, file: Path) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(file)
        return self._files[file]

    def locate(self, name: str) -> Path | None:
        if self.weight_map is None:
            single = self.root / SINGLE_FILE
            return single if name in self._files[single] else None
        return self.weight_map.get(name)

    def names(self) -> set[str]:
        if self.weight_map is None:
            return set(self._files[self.root / SINGLE_FILE].keys())
        return set(self.weight_map)

    def read(self, m: TensorMapping) -> tuple[np.ndarray, str]:
        """The HF tensor for ``m`` (lazy, our layout) and the name it was found under."""
        for name in (m.hf_name, *m.aliases):
            file = self.locate(name)
            if file is None:
                continue
            st = self._file(file)
            if name not in st:
                raise CheckpointError(f"{file}: tensor {name!r} listed in {INDEX_FILE} is missing from the file")
            if st.shape(name) != m.hf_shape:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {st.shape(name)}, expected {m.hf_shape} from config.json"
                )
            return m.to_ours(st.get(name)), name
        raise CheckpointError(f"{self.source}: tensor {m.hf_name!r} is missing")


def _place(layers: list[np.ndarray], dtype, axes, sharding_fn: ShardingFn | None, stacked: bool) -> jax.Array:
    """One parameter from its tensors (one, or with ``stacked`` one per layer, stacked on a
    leading axis), each device's shard read from those tensors' matching slices."""
    shape = (len(layers), *layers[0].shape) if stacked else layers[0].shape

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(layers[0][index], dtype=dtype)
        return np.stack([np.asarray(x[index[1:]], dtype=dtype) for x in layers[index[0]]])

    if sharding_fn is None:
        return jnp.asarray(read((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, sharding_fn(axes, shape), read)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    sharding_fn: ShardingFn | None = None, remat: str = "none", query_block: int = 128,
                    scan_layers: bool | None = None) -> CausalLM:
    """Our decoder with the weights of the local HF checkpoint directory ``path``.

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype parameters are stored in (cast on
    the fly). ``sharding_fn(logical_axes, shape) -> Sharding`` places each parameter (default:
    the default device). ``remat`` is the per-layer rematerialisation policy, ``query_block`` the
    attention's query block, ``scan_layers`` the layout (``ModelConfig``; ``None``: stacked for
    models of at least ``SCAN_MIN_LAYERS`` layers). Raises
    ``UnsupportedModelError`` for an unsupported architecture or option and ``CheckpointError``
    naming the file and tensor for missing, corrupt or misshaped weights.
    """
    path = Path(path)
    config = load_config(path, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers)
    config = config.replace(query_block=query_block)
    tensors = CheckpointTensors(path)
    graphdef, state = nnx.split(abstract_model(config))
    mappings = {m.path: m for m in tensor_mappings(config)}
    used = set()
    leaves = []
    for key, var in nnx.to_flat_state(state):
        layers = []
        for unrolled in layer_paths(key, config.num_layers):
            x, name = tensors.read(mappings[unrolled])
            used.add(name)
            layers.append(x)
        axes = var.get_metadata().get("out_sharding")
        leaves.append((key, var.replace(_place(layers, config.param_dtype, axes, sharding_fn, is_stacked(var)))))
    unused = sorted(tensors.names() - used - {SCORE_NAME})  # a reward model's head: load_reward_model
    if unused:
        log.warning("%s: %d tensors not used by the %s decoder, e.g. %s", tensors.source, len(unused),
                    config.family, unused[:5])
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
