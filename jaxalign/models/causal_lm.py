"""The interface every decoder implements (docs/architecture.md, "Model").

A subclass provides ``embed(input_ids, positions)``, ``token_embedding()``, ``lm_head`` (None
when tied), ``layers`` (``stacked.make_layers``: an ``nnx.List`` of blocks, or with
``config.scan_layers`` one block of stacked parameters, scanned; a block is called as
``block(x, encoding, mask, kv, index) -> (x, kv)`` with ``encoding =
position_encoding(positions)``) and ``final_norm(x)``.

Activations carry logical axis names (``jaxalign.parallel.with_logical_constraint``, the
identity outside a mesh context): the residual stream ``("batch", "length", "embed")`` after
the embedding and after every block, so under FSDP the weights are gathered, not the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.attention import dot_product_attention, make_attention_mask, resolve_positions_and_segments
from jaxalign.models.cache import KVCache, write_slots
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import RESIDUAL
from jaxalign.models.stacked import checkpointed, scan_blocks
from jaxalign.parallel.rules import with_logical_constraint


def _apply_block(block, x, encoding, mask):
    return with_logical_constraint(block(x, encoding, mask, None, None)[0], RESIDUAL)


class CausalLM(nnx.Module):
    config: ModelConfig

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        raise NotImplementedError

    def position_encoding(self, positions: jax.Array):
        """What every block receives for the token ``positions [B, L]``, computed once per
        forward: the positions themselves unless the decoder overrides it (Llama: its RoPE
        tables)."""
        return positions

    def final_norm(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def token_embedding(self) -> jax.Array:
        """The input embedding table ``[V, D]`` (float32 master weights)."""
        raise NotImplementedError

    def unembedding(self, dtype=None) -> jax.Array:
        """The output projection ``[D, V]`` (the embedding, transposed, when tied) in ``dtype``,
        by default the compute dtype."""
        w = self.token_embedding().T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.config.dtype if dtype is None else dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Float32 logits ``[B, L, V]``; ``logits[:, t]`` scores token ``t + 1``.

        ``positions``/``segment_ids`` default to those implied by ``attention_mask``
        (see ``resolve_positions_and_segments``), so left and right padding both work.
        """
        h = self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
        return self.logits(h)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., D] @ unembedding() -> [..., V]``, accumulated and returned in float32."""
        return jnp.einsum("...d,dv->...v", hidden, self.unembedding(), preferred_element_type=jnp.float32)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states ``[B, L, D]`` in the compute dtype."""
        positions, segment_ids = resolve_positions_and_segments(input_ids, attention_mask, positions, segment_ids)
        index = jnp.arange(input_ids.shape[1])
        mask = make_attention_mask(index, index, segment_ids, segment_ids, positions, positions,
                              self.config.sliding_window)
        x = with_logical_constraint(self.embed(input_ids, positions), RESIDUAL)
        return self.final_norm(self._blocks(x, self.position_encoding(positions), mask))

    def _blocks(self, x: jax.Array, encoding, mask: jax.Array) -> jax.Array:
        """Every block in turn (scanned when stacked), each rematerialised per ``config.remat``."""
        c = self.config
        if c.scan_layers:
            return scan_blocks(self.layers, lambda block, x, _: (_apply_block(block, x, encoding, mask), None), x,
                               remat=c.remat)[0]
        for block in self.layers:
            x = checkpointed(lambda block, x: _apply_block(block, x, encoding, mask), block, x, remat=c.remat)
        return x

    def init_cache(self, batch_size: int, size: int) -> KVCache:
        """An empty cache for ``batch_size`` rows of ``size`` slots, in the compute dtype."""
        c = self.config
        return KVCache.empty(c.num_layers, batch_size, size, c.num_kv_heads, c.head_dim, c.dtype,
                             stacked=c.scan_layers)

    def decode(self, input_ids: jax.Array, cache: KVCache, *, positions: jax.Array,
               segment_ids: jax.Array, logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Run ``input_ids [B, T]`` against ``cache``, writing them at its next ``T`` slots.

        Prefill is a call with the whole (left- or right-padded) prompt into an empty cache; a
        decode step is a call with one token per row. Returns float32 logits ``[B, T, V]`` (or,
        with ``logits_at [B]``, ``[B, 1, V]`` at those positions only: a prefill needs just the
        last token's) and the updated cache. The caller sizes the cache: writing past its end
        is an error when the index is concrete (and is clamped by XLA under ``jit``).
        """
        t = input_ids.shape[1]
        start = cache.index
        if not isinstance(start, jax.core.Tracer) and int(start) + t > cache.size:
            raise ValueError(f"KV cache overflow: {int(start)} + {t} tokens > {cache.size} slots")
        positions = jnp.asarray(positions, jnp.int32)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        all_segments = write_slots(cache.segment_ids, segment_ids, start)
        all_positions = write_slots(cache.positions, positions, start)
        mask = make_attention_mask(start + jnp.arange(t), jnp.arange(cache.size), segment_ids, all_segments,
                              positions, all_positions, self.config.sliding_window)
        x = with_logical_constraint(self.embed(input_ids, positions), RESIDUAL)
        encoding = self.position_encoding(positions)

        def run(block, x, kv):
            x, kv = block(x, encoding, mask, kv, start)
            return with_logical_constraint(x, RESIDUAL), kv

        if self.config.scan_layers:
            x, (keys, values) = scan_blocks(self.layers, run, x, (cache.keys, cache.values))
        else:
            keys, values = [], []
            for block, k, v in zip(self.layers, cache.keys, cache.values, strict=True):
                x, (k, v) = run(block, x, (k, v))
                keys.append(k)
                values.append(v)
            keys, values = tuple(keys), tuple(values)
        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]
        logits = self.logits(self.final_norm(x))
        return logits, KVCache(keys, values, all_segments, all_positions, start + t)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv, index, scale: float, query_block: int):
    """Attention of ``q`` over this call's ``k, v`` (no cache: ``query_block`` queries at a time,
    see ``dot_product_attention``) or over the cache with them written in."""
    if kv is None:
        return dot_product_attention(q, k, v, mask, scale, query_block=query_block), None
    # The cache is head-major [B, KV, S, Dh]: only this call's few tokens are transposed.
    k_all = write_slots(kv[0], jnp.swapaxes(k, 1, 2), index, axis=2)
    v_all = write_slots(kv[1], jnp.swapaxes(v, 1, 2), index, axis=2)
    return dot_product_attention(q, k_all, v_all, mask, scale, head_major=True), (k_all, v_all)
