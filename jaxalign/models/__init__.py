"""Flax NNX decoders (Llama family incl. Qwen2/Mistral, GPT-2) and HF safetensors import/export.

Public API (docs/architecture.md, "Model"): ``from_pretrained``, ``save_pretrained``,
``ModelConfig``, ``make_model``; the logical axis names of parameters are listed in
``jaxalign/models/README.md``.
"""

from jaxalign.models.build import abstract_model, make_model
from jaxalign.models.cache import KVCache
from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import ModelConfig, RopeScaling, from_hf_config, to_hf_config
from jaxalign.models.errors import CheckpointError, UnsupportedModelError
from jaxalign.models.hf_export import save_pretrained
from jaxalign.models.hf_import import from_pretrained, load_config

__all__ = [
    "CausalLM",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "UnsupportedModelError",
    "abstract_model",
    "from_hf_config",
    "from_pretrained",
    "load_config",
    "make_model",
    "save_pretrained",
    "to_hf_config",
]
