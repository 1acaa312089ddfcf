"""Autoregressive generation with a KV cache, as one jitted function.

The prompt (left- or right-padded; padding has ``prompt_mask == 0``) is prefilled into a cache
of ``prompt_length + max_new_tokens`` slots; each step samples one token per row from the
logits after the row's last real token, writes it at the next slot with the next position,
and stops a row once it emits one of ``eos_ids`` (the EOS token itself is kept and masked in).
The loop ends early when every row has stopped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.attention import positions_from_segments
from jaxalign.models.causal_lm import CausalLM


class Generation(NamedTuple):
    """``tokens [B, T]`` int32 (``pad_id`` after a row stopped) and ``mask [B, T]`` int32 (1 on generated tokens)."""

    tokens: jax.Array
    mask: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (``[..., V]``).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (a token is kept when the mass of strictly more likely tokens is below ``top_p``); tokens
    tied with the last kept one are kept too.
    """
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def sample_tokens(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """One token per row of ``logits [B, V]``: argmax when ``temperature == 0``, else a sample
    from ``softmax(filter_logits(logits / temperature))``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def _generate(graphdef, params, prompt_ids, prompt_mask, rng, *, max_new_tokens, temperature, top_k, top_p,
              eos_ids, pad_id) -> Generation:
    model: CausalLM = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_ids.shape
    segments = (prompt_mask != 0).astype(jnp.int32)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.decode(prompt_ids, cache, positions=positions_from_segments(segments), segment_ids=segments)
    last = prompt_len - 1 - jnp.argmax(segments[:, ::-1], axis=-1)
    next_logits = logits[jnp.arange(batch), last]
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, next_logits, next_pos, cache, done, tokens, mask, rng = carry
        rng, key = jax.random.split(rng)
        token = sample_tokens(next_logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        mask = mask.at[:, step].set((~done).astype(jnp.int32))
        for eos in eos_ids:
            done = done | (token == eos)
        logits, cache = model.decode(token[:, None], cache, positions=next_pos[:, None], segment_ids=ones)
        return step + 1, logits[:, 0], next_pos + 1, cache, done, tokens, mask, rng

    carry = (
        jnp.zeros((), jnp.int32), next_logits, segments.sum(axis=-1), cache, jnp.zeros((batch,), bool),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32), rng,
    )
    carry = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens=carry[5], mask=carry[6])


_generate_jit = jax.jit(
    _generate,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "pad_id"),
)


def generate(model: CausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
             eos_ids: tuple[int, ...] | list[int] | int = (), rng: jax.Array, pad_id: int = 0) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt row (jitted; compiled once per
    model structure, prompt shape and sampling settings).

    ``prompt_ids``/``prompt_mask`` are ``[B, L]`` (any padding side); ``temperature == 0`` is
    greedy; ``top_k``/``top_p`` filter the distribution (see ``filter_logits``); a row stops
    after emitting any of ``eos_ids``; ``rng`` is a JAX PRNG key.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if jnp.shape(prompt_ids) != jnp.shape(prompt_mask) or jnp.ndim(prompt_ids) != 2:
        raise ValueError(f"prompt_ids {jnp.shape(prompt_ids)} and prompt_mask {jnp.shape(prompt_mask)} must be equal [B, L]")
    eos = (eos_ids,) if isinstance(eos_ids, int) else tuple(int(e) for e in eos_ids)
    graphdef, params = nnx.split(model)
    return _generate_jit(
        graphdef, params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32), rng,
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=top_k,
        top_p=None if top_p is None else float(top_p), eos_ids=eos, pad_id=int(pad_id),
    )
