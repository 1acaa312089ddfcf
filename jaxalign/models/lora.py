"""LoRA adapters on the decoders' projections, merging them, and the PEFT adapter format.

A projection ``y = x W`` with ``W [*in, *out]`` gets ``A [*in, r]`` and ``B [r, *out]``:

    y = x W + (alpha / r) * (x A) B.

``A`` is drawn as peft's default (``kaiming_uniform_(a=sqrt(5))`` on its ``[r, in]`` weight:
``U(-1/sqrt(in), 1/sqrt(in))``), ``B = 0``, so a fresh adapter leaves the model unchanged.
Adapters are ``LoRAParam`` variables (a subclass of ``nnx.Param``): ``nnx.split(model,
LoRAParam, nnx.Param)`` separates them from the base weights. ``A`` carries the input's
logical axes and ``B`` the output's (the rank axis is replicated), so the rule table of
``jaxalign.parallel`` shards them like the kernel they adapt. With stacked layers
(``ModelConfig.scan_layers``) they are stacked like the kernels: ``A [layers, *in, r]``,
``B [layers, r, *out]``.

PEFT layout (``save_adapter``): ``base_model.model.<HF module>.lora_A.weight [r, in]`` and
``lora_B.weight [out, r]``, with ``in``/``out`` flattened as in the HF kernel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.hf_export import _to_host
from jaxalign.models.hf_names import tensor_mappings
from jaxalign.models.layers import Projection
from jaxalign.models.safetensors_io import save_file
from jaxalign.models.stacked import is_stacked, layer_paths

__all__ = [
    "LoRAParam", "adapted_projections", "adapters_off", "add_adapters", "join_adapters", "load_adapter",
    "merge_adapters", "save_adapter", "split_adapters",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

ShardingFn = Callable[[tuple[str | None, ...], tuple[int, ...]], jax.sharding.Sharding]


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: trained, while the base weights (plain ``nnx.Param``) stay frozen."""


def _lora_param(value: np.ndarray, axes: tuple[str | None, ...], dtype, sharding_fn: ShardingFn | None) -> LoRAParam:
    if sharding_fn is None:
        array = jnp.asarray(value.astype(dtype))
    else:
        array = jax.device_put(value.astype(dtype), sharding_fn(axes, value.shape))
    return LoRAParam(array, out_sharding=axes, eager_sharding=False)


def adapted_projections(model: CausalLM) -> list[tuple[tuple, Projection]]:
    """``(path, projection)`` of every projection that holds an adapter, in graph order."""
    return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, Projection) and m.lora_a is not None]


def _layer_adapters(model: CausalLM) -> list[tuple[tuple, Projection, int | None]]:
    """``(unrolled path, projection, layer)`` per layer of every adapted projection: ``layer``
    indexes the stacked adapters (``scan_layers``), None for a projection of its own."""
    out = []
    for where, module in adapted_projections(model):
        if is_stacked(module.kernel):
            out += [(path, module, i) for i, path in enumerate(layer_paths(where, model.config.num_layers))]
        else:
            out.append((where, module, None))
    return out


def add_adapters(model: CausalLM, *, rank: int, alpha: float, targets: Sequence[str], seed: int = 0,
                 sharding_fn: ShardingFn | None = None) -> CausalLM:
    """Puts a rank-``rank`` adapter on every projection named in ``targets`` (in place); returns
    ``model``. ``ValueError`` when ``rank < 1`` or a target names no projection of the model.

    With stacked layers the adapters are stacked too (``A [layers, *in, r]``, ``B [layers, r,
    *out]``) and drawn layer by layer in the unrolled model's order: both layouts get the same
    adapters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rng = np.random.default_rng(seed)
    projections = [(path, m) for path, m in nnx.iter_graph(model)
                   if isinstance(m, Projection) and path and path[-1] in targets]
    missing = sorted(set(targets) - {path[-1] for path, _ in projections})
    if missing:
        raise ValueError(f"LoRA targets {missing} name no projection of the {model.config.family} model")
    stacked = model.config.scan_layers
    draws: dict[tuple, list[np.ndarray]] = {path: [] for path, _ in projections}
    for _ in range(model.config.num_layers if stacked else 1):
        for path, module in projections:
            in_shape = module.kernel.shape[stacked:stacked + module.n_in]
            bound = 1.0 / np.sqrt(int(np.prod(in_shape)))
            draws[path].append(rng.uniform(-bound, bound, (*in_shape, rank)).astype(np.float32))
    for path, module in projections:
        shape, axes = module.kernel.shape, tuple(module.kernel.get_metadata()["out_sharding"])
        split, dtype = stacked + module.n_in, np.dtype(module.kernel.dtype)
        a = np.stack(draws[path]) if stacked else draws[path][0]
        b = np.zeros((*shape[:stacked], rank, *shape[split:]), np.float32)
        module.lora_a = _lora_param(a, (*axes[:split], None), dtype, sharding_fn)
        module.lora_b = _lora_param(b, (*axes[:stacked], None, *axes[split:]), dtype, sharding_fn)
        module.lora_scale = alpha / rank
    return model


def merge_adapters(model: CausalLM) -> CausalLM:
    """Folds each adapter into its kernel, ``W <- W + (alpha / r) A B`` (float32, then the
    kernel's dtype; per layer when stacked), and removes the adapters (in place); returns ``model``."""
    for _, module in adapted_projections(model):
        kernel = module.kernel[...]
        product = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
        if is_stacked(module.kernel):
            product = jax.vmap(product)
        delta = product(module.lora_a[...].astype(jnp.float32), module.lora_b[...].astype(jnp.float32))
        module.kernel[...] = (kernel.astype(jnp.float32) + module.lora_scale * delta).astype(kernel.dtype)
        module.lora_a = nnx.data(None)
        module.lora_b = nnx.data(None)
        module.lora_scale = 0.0
    return model


def save_adapter(model: CausalLM, path: str | os.PathLike, *, alpha: float, base_model: str = "") -> Path:
    """Writes the adapters of ``model`` as a PEFT LoRA directory (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the base
    checkpoint; returns ``path``. Every process calls it; process 0 writes."""
    adapted = _layer_adapters(model)
    if not adapted:
        raise ValueError("the model holds no LoRA adapters")
    hf_names = {m.path: m.hf_name for m in tensor_mappings(model.config)}
    tensors, targets, ranks = {}, set(), set()
    for where, module, layer in adapted:
        name = _PEFT_PREFIX + hf_names[(*where, "kernel")].removesuffix(".weight")
        a, b = (module.lora_a[...], module.lora_b[...]) if layer is None else (module.lora_a[layer], module.lora_b[layer])
        a, b = _to_host(a).astype(np.float32), _to_host(b).astype(np.float32)
        rank = a.shape[-1]
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
        targets.add(str(where[-1]))
        ranks.add(rank)
    path = Path(path)
    if jax.process_index() != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks.pop(), "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": model.config.is_gpt2,
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def load_adapter(model: CausalLM, path: str | os.PathLike) -> dict:
    """Sets the adapters of ``model`` (added by ``add_adapters``) to a PEFT LoRA directory's
    weights (the inverse of ``save_adapter``: ``A = lora_A.T``, ``B = lora_B.T``, each placed with
    the adapter's own sharding); returns its ``adapter_config.json``. ``ValueError`` naming what
    does not match (a missing file, another rank, a projection the directory lacks or holds
    beyond the model's adapters)."""
    from safetensors.numpy import load_file

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a PEFT LoRA adapter directory: no {name}")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}/{ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}, not 'LORA'")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    hf_names = {m.path: m.hf_name for m in tensor_mappings(model.config)}
    for where, module, layer in _layer_adapters(model):
        name = _PEFT_PREFIX + hf_names[(*where, "kernel")].removesuffix(".weight")
        try:
            a, b = tensors.pop(f"{name}.lora_A.weight"), tensors.pop(f"{name}.lora_B.weight")
        except KeyError:
            raise ValueError(f"{path}: no adapter for {name} (the run adapts {where[-1]})") from None
        for variable, value in ((module.lora_a, a.T), (module.lora_b, b.T)):
            current = variable[...]
            shape = current.shape if layer is None else current.shape[1:]
            if value.size != np.prod(shape):
                rank = shape[-1] if variable is module.lora_a else shape[0]
                raise ValueError(f"{path}: {name} has rank {a.shape[0]}, the run's adapters rank {rank}")
            value = jnp.asarray(value.reshape(shape), current.dtype)
            variable[...] = jax.device_put(value if layer is None else current.at[layer].set(value), current.sharding)
    if tensors:
        raise ValueError(f"{path}: adapters for projections the run does not adapt: {sorted(tensors)[:3]}")
    return config


def split_adapters(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(adapters, base)``: the ``LoRAParam`` and the other leaves of a model's parameters."""
    return nnx.split_state(params, LoRAParam, ...)


def join_adapters(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The model's parameters from its base weights and its adapters (no copy)."""
    return nnx.merge_state(base, adapters)


def adapters_off(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The parameters with every adapter zero: ``y = x W`` exactly (the base model)."""
    return nnx.merge_state(base, jax.tree.map(jnp.zeros_like, adapters))
