"""The decode loop: prefill once, share it over ``n`` samples, sample token by token, one program.

``decode(graphdef, params, prompt_ids, prompt_mask, keys, temperature, top_p, ...)`` runs under
``jit`` on parameters as the train state holds them (any sharding; nothing is gathered):

1. the floating matrices (``ndim >= 2`` per layer: projections, embeddings) are cast to the model's
   compute dtype once per call, not once per step (the forward casts them to that dtype
   anyway, so the numbers are the same);
2. the ``B`` prompts (left- or right-padded; padding has ``prompt_mask == 0``) are prefilled
   into a KV cache in the compute dtype of ``prompt_length + max_new_tokens`` slots; only the
   last real token's logits are computed;
3. the cache and those logits are repeated ``n = num_samples`` times (row ``b * n + s`` is
   sample ``s`` of prompt ``b``): the prompt is prefilled once for all its samples;
4. a ``while_loop`` samples one token per row per step and writes it into the cache in place;
   a row stops after any of ``stop_ids`` (kept, masked in); the loop ends when every row has
   stopped or after ``max_new_tokens`` steps.

Randomness: row ``r``'s token at step ``t`` is drawn with ``fold_in(keys[r], t)``: a row's
samples depend on its own key only, not on the batch it is in. ``temperature`` and ``top_p``
are traced (changing them does not recompile; the nucleus sort runs only when ``top_p < 1``);
``top_k`` is static. ``logps`` are the sampled tokens' log-probs under the unmodified model
(raw logits, before temperature and filters), e.g. for KL estimates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.attention import positions_from_segments
from jaxalign.models.stacked import is_stacked

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "Generation", "decode", "filter_logits", "sample_tokens"]

FINISH_STOP, FINISH_LENGTH = 0, 1  # finish reasons: a stop id was sampled / max_new_tokens reached


class Generation(NamedTuple):
    """Per row: ``tokens [R, T]`` int32 (``pad_id`` after the row stopped), ``mask [R, T]`` int32
    (1 on generated tokens, the stop token included), ``logps [R, T]`` float32 (0 where masked
    out), ``finish [R]`` int32 (``FINISH_STOP`` or ``FINISH_LENGTH``)."""

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    finish: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p: float | jax.Array | None = None) -> jax.Array:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (``[..., V]``).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (a token is kept when the mass of strictly more likely tokens is below ``top_p``); tokens
    tied with the last kept one are kept too. ``top_p`` may be traced: the sort is skipped
    (``lax.cond``) when it is 1.
    """
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is None:
        return logits

    def nucleus(x: jax.Array) -> jax.Array:
        desc = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < threshold, neg_inf, x)

    return jax.lax.cond(jnp.asarray(top_p) < 1.0, nucleus, lambda x: x, logits)


def sample_tokens(logits: jax.Array, keys: jax.Array, *, temperature: float | jax.Array, top_k: int | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
    """One token per row of ``logits [R, V]``, row ``r`` drawn with ``keys[r]``: argmax when
    ``temperature == 0`` (no random draw at all), else a sample from ``p =
    softmax(filter_logits(logits / temperature))`` by inversion: the first token whose
    cumulative ``p`` exceeds one uniform ``u * sum(p)`` (one random number per row, not one
    per vocabulary entry as Gumbel-max needs)."""
    temperature = jnp.asarray(temperature, jnp.float32)

    def draw(x: jax.Array) -> jax.Array:
        scaled = filter_logits(x.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
        cdf = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)
        u = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys) * cdf[:, -1]
        token = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side="right"))(cdf, u)
        return jnp.minimum(token, x.shape[-1] - 1).astype(jnp.int32)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, greedy, draw, logits)


def _compute_dtype_params(graphdef: nnx.GraphDef, params):
    """The parameters with their floating matrices in the model's compute dtype."""
    dtype = nnx.merge(graphdef, params).config.dtype

    def cast(variable: nnx.Variable) -> nnx.Variable:
        x = variable.get_value()
        matrix = x.ndim - is_stacked(variable) >= 2  # per layer: a stacked norm scale is no matrix
        return variable.replace(x.astype(dtype)) if matrix and jnp.issubdtype(x.dtype, jnp.floating) else variable

    return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def decode(graphdef: nnx.GraphDef, params, prompt_ids: jax.Array, prompt_mask: jax.Array, keys: jax.Array,
           temperature: jax.Array, top_p: jax.Array, *, max_new_tokens: int, num_samples: int = 1,
           top_k: int | None = None, stop_ids: tuple[int, ...] = (), pad_id: int = 0) -> Generation:
    """See the module docstring. ``prompt_ids``/``prompt_mask``: ``[B, L]``; ``keys``: ``[B *
    num_samples]`` PRNG keys (row ``b * num_samples + s``). Returns ``B * num_samples`` rows."""
    model = nnx.merge(graphdef, _compute_dtype_params(graphdef, params))
    batch, prompt_len = prompt_ids.shape
    rows = batch * num_samples
    segments = (prompt_mask != 0).astype(jnp.int32)
    last = prompt_len - 1 - jnp.argmax(segments[:, ::-1], axis=-1)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.decode(prompt_ids, cache, positions=positions_from_segments(segments),
                                 segment_ids=segments, logits_at=last)
    if num_samples > 1:
        cache = cache.repeat_rows(num_samples)
        logits = jnp.repeat(logits, num_samples, axis=0)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    ones = jnp.ones((rows, 1), jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[-1]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, position, cache, out, done = carry
        raw = logits[:, 0]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        token = sample_tokens(raw, step_keys, temperature=temperature, top_k=top_k, top_p=top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(raw, axis=-1), token[:, None], axis=-1)[:, 0]
        live = ~done
        tokens, mask, logps = out
        out = (tokens.at[:, step].set(jnp.where(live, token, pad_id)),
               mask.at[:, step].set(live.astype(jnp.int32)),
               logps.at[:, step].set(jnp.where(live, logp, 0.0)))
        done = done | jnp.isin(token, stops)
        logits, cache = model.decode(token[:, None], cache, positions=position[:, None], segment_ids=ones)
        return step + 1, logits, position + 1, cache, out, done

    out = (jnp.full((rows, max_new_tokens), pad_id, jnp.int32), jnp.zeros((rows, max_new_tokens), jnp.int32),
           jnp.zeros((rows, max_new_tokens), jnp.float32))
    position = jnp.repeat(segments.sum(axis=-1), num_samples)
    carry = (jnp.zeros((), jnp.int32), logits, position, cache, out, jnp.zeros((rows,), bool))
    _, _, _, _, (tokens, mask, logps), done = jax.lax.while_loop(cond, body, carry)
    finish = jnp.where(done, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return Generation(tokens, mask, logps, finish)
