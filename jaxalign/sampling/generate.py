"""``generate``: a batch of prompt rows -> completions, in one jitted call of the decode loop.

A convenience on a merged model for one batch (``jaxalign.sampling.decode``); for many prompts,
``n`` samples each, seeded per prompt and sample, bucketed and sharded, use
``jaxalign.sampling.sample``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.causal_lm import CausalLM
from jaxalign.sampling.decode import Generation, decode

__all__ = ["check_settings", "generate"]

_decode = jax.jit(decode, static_argnames=("graphdef", "max_new_tokens", "num_samples", "top_k", "stop_ids", "pad_id"))


def check_settings(*, max_new_tokens: int, temperature: float, top_p: float | None, top_k: int | None) -> None:
    """``ValueError`` naming the first setting out of range."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def generate(model: CausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
             eos_ids: tuple[int, ...] | list[int] | int = (), rng: jax.Array, pad_id: int = 0) -> Generation:
    """Up to ``max_new_tokens`` tokens after each prompt row (compiled once per model structure,
    prompt shape, ``top_k`` and stop ids; temperature and top-p are traced).

    ``prompt_ids``/``prompt_mask`` are ``[B, L]`` (any padding side); ``temperature == 0`` is
    greedy; ``top_k``/``top_p`` filter the distribution (``filter_logits``); a row stops after
    emitting any of ``eos_ids``; row ``r`` samples with ``fold_in(rng, r)``.
    """
    check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if jnp.shape(prompt_ids) != jnp.shape(prompt_mask) or jnp.ndim(prompt_ids) != 2:
        raise ValueError(f"prompt_ids {jnp.shape(prompt_ids)} and prompt_mask {jnp.shape(prompt_mask)} must be equal [B, L]")
    stops = (eos_ids,) if isinstance(eos_ids, int) else tuple(int(e) for e in eos_ids)
    graphdef, params = nnx.split(model)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(jnp.shape(prompt_ids)[0]))
    return _decode(
        graphdef, params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32), keys,
        jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p), max_new_tokens=int(max_new_tokens),
        top_k=top_k, stop_ids=stops, pad_id=int(pad_id),
    )
