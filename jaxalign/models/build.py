"""Constructing decoders: randomly initialised, or abstract (shapes only) for checkpoint loading."""

from __future__ import annotations

from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import ModelConfig
from jaxalign.models.gpt2 import GPT2LMHeadModel
from jaxalign.models.layers import Initializer
from jaxalign.models.llama import LlamaForCausalLM


def model_class(config: ModelConfig) -> type[CausalLM]:
    return GPT2LMHeadModel if config.is_gpt2 else LlamaForCausalLM


def make_model(config: ModelConfig, *, seed: int = 0) -> CausalLM:
    """A decoder with random weights: kernels and embeddings N(0, 0.02^2), norm scales 1, biases 0.

    Weights are drawn on the host with numpy (``seed`` fixes them) and put on the default device.
    """
    return model_class(config)(config, init=Initializer(seed))


def abstract_model(config: ModelConfig) -> CausalLM:
    """The decoder with ``jax.ShapeDtypeStruct`` leaves: no memory is allocated."""
    return model_class(config)(config, init=Initializer(None))
