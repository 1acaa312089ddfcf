"""The model forward passes that score sequences, on parameters held as a plain pytree.

The model is split once outside ``jit`` (``graphdef, params = nnx.split(model, nnx.Param)``)
and merged inside (``nnx.merge(graphdef, params)``), following docs/architecture.md. All
per-token and per-sequence quantities are float32.

* ``token_logps``: label-aligned per-token log-probs ``[R, L]`` of the tokens the batch's
  ``loss_mask`` scores (0 elsewhere), from the final hidden states and the unembedding:
  only scored positions go through the unembedding, ``chunk`` positions per row at a time,
  so that no float32 ``[R, L, V]`` logits array exists.
* ``sequence_logps``: per-sequence sums ``sum_t loss_mask * logp`` and token counts over the
  batch's ``sequence_ids`` (works for padded and packed layouts alike).
* ``sequence_rewards``: a scalar reward per sequence, ``h_last . w``, where ``h_last`` is
  the final hidden state at the sequence's last token (its last non-padding token). The head
  has no bias: under Bradley-Terry only reward differences enter the loss, so a bias would
  never get a gradient; it is Hugging Face's ``score = Linear(D, 1, bias=False)``.

``Forward`` binds a model's graph and the LM head's layout (chunk, row groups) to these
functions; it is what an objective (``jaxalign.objectives``) receives.
``sequence_logps_fn`` is the jitted reference pass (per-sequence sums) of the reference cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses

__all__ = [
    "Forward",
    "hidden_states",
    "init_reward_head",
    "logits_chunk_size",
    "sequence_logps",
    "sequence_logps_fn",
    "sequence_rewards",
    "token_logps",
]

Batch = dict[str, jax.Array]

# Budget for one chunk of float32 logits: rows * chunk * vocab * 4 bytes.
_CHUNK_BYTES = 64 * 2**20
# At most this many positions per chunk over all rows: only the scored positions go through the
# unembedding, ranked first, so the last chunk's unscored rest is what the LM head wastes.
_CHUNK_POSITIONS = 256


def logits_chunk_size(rows: int, length: int, vocab: int, requested: int = 0) -> int:
    """Sequence positions per unembedding chunk: ``requested`` if > 0, else the largest
    chunk whose float32 logits fit in 64 MiB and that holds at most 256 positions over the
    ``rows``; at least 16 and at most ``length``."""
    if requested > 0:
        return min(requested, length)
    fits = min(_CHUNK_BYTES // max(rows * vocab * 4, 1), _CHUNK_POSITIONS // rows)
    return int(max(min(fits, length), min(16, length)))


def hidden_states(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, Any]:
    """Final hidden states ``[R, L, D]`` (after the final norm) and the merged model."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(
        batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    return hidden, model


def token_logps(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, *, chunk: int = 0, row_groups: int = 1,
    all_positions: bool = False,
) -> jax.Array:
    """Label-aligned float32 log-probs ``[R, L]`` under the model of the tokens with
    ``loss_mask > 0``; 0 on every other token (never projected through the unembedding).

    The scored positions are ranked within ``row_groups`` groups of rows (the devices that
    split the rows; see ``losses.token_logps_from_hidden``); ``chunk`` > 0 sets the positions
    per row and chunk, which a group of ``R / G`` rows multiplies. ``all_positions`` projects
    every position through the unembedding and returns every token's log-prob (slower: the
    benchmark's ablation of the scored-positions head)."""
    if all_positions:
        batch = {**batch, "loss_mask": jnp.ones_like(batch["loss_mask"])}
    hidden, model = hidden_states(graphdef, params, batch)
    unembedding = model.unembedding(dtype=model.config.param_dtype)  # cast per chunk: gradient summed in param_dtype
    rows, length = batch["input_ids"].shape
    groups = math.gcd(rows, row_groups)
    per_group = rows // groups
    size = logits_chunk_size(groups, per_group * length, unembedding.shape[-1], chunk * per_group)
    return losses.token_logps_from_hidden(
        hidden, unembedding, batch["input_ids"], chunk_size=size, segment_ids=batch["segment_ids"],
        loss_mask=batch["loss_mask"], row_groups=groups,
    )


def sequence_logps(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, *, num_sequences: int, chunk: int = 0, row_groups: int = 1,
    all_positions: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(token_logps [R, L], sums [S], counts [S])`` with ``S = num_sequences``."""
    tokens = token_logps(graphdef, params, batch, chunk=chunk, row_groups=row_groups, all_positions=all_positions)
    sums, counts = losses.segment_logps(
        tokens, batch["loss_mask"], batch["sequence_ids"], num_sequences=num_sequences
    )
    return tokens, sums, counts


def last_token_index(sequence_ids: jax.Array, num_sequences: int) -> jax.Array:
    """Flat index (into ``[R * L]``) of each sequence's last token; 0 for an empty sequence."""
    flat = sequence_ids.reshape(-1)
    positions = jnp.arange(flat.shape[0], dtype=jnp.int32)
    valid = flat >= 0
    index = jax.ops.segment_max(
        jnp.where(valid, positions, -1), jnp.where(valid, flat, 0), num_segments=num_sequences
    )
    return jnp.maximum(index, 0)


def init_reward_head(hidden_size: int, seed: int) -> dict[str, jax.Array]:
    """A scalar head ``{"kernel": [D]}``, kernel ~ N(0, 1/D) (float32); no bias."""
    kernel = jax.random.normal(jax.random.PRNGKey(seed), (hidden_size,), jnp.float32) / jnp.sqrt(hidden_size)
    return {"kernel": kernel}


def sequence_rewards(
    graphdef: nnx.GraphDef, params: Any, head: dict[str, jax.Array], batch: Batch, *, num_sequences: int
) -> jax.Array:
    """Float32 rewards ``[S]``: ``h_last . kernel``, the head applied to each sequence's
    last-token hidden state."""
    hidden, _ = hidden_states(graphdef, params, batch)
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    last = flat[last_token_index(batch["sequence_ids"], num_sequences)]
    return last @ head["kernel"]


@dataclasses.dataclass(frozen=True)
class Forward:
    """A model's forward passes with the LM head's layout fixed: ``chunk`` positions per
    unembedding chunk (0 = default), ``row_groups`` (the devices that split a batch's rows),
    ``all_positions`` (unembed every position: the benchmark's ablation). Methods take the
    model's parameter pytree and a batch (docs/architecture.md)."""

    graphdef: nnx.GraphDef
    chunk: int = 0
    row_groups: int = 1
    all_positions: bool = False

    def token_logps(self, params: Any, batch: Batch) -> jax.Array:
        """See ``token_logps``."""
        return token_logps(self.graphdef, params, batch, chunk=self.chunk, row_groups=self.row_groups,
                           all_positions=self.all_positions)

    def sequence_logps(self, params: Any, batch: Batch, num_sequences: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """See ``sequence_logps``."""
        return sequence_logps(self.graphdef, params, batch, num_sequences=num_sequences, chunk=self.chunk,
                              row_groups=self.row_groups, all_positions=self.all_positions)

    def hidden_states(self, params: Any, batch: Batch) -> tuple[jax.Array, Any]:
        """See ``hidden_states``."""
        return hidden_states(self.graphdef, params, batch)

    def sequence_rewards(self, params: Any, head: dict[str, jax.Array], batch: Batch, num_sequences: int) -> jax.Array:
        """See ``sequence_rewards``."""
        return sequence_rewards(self.graphdef, params, head, batch, num_sequences=num_sequences)


def sequence_logps_fn(forward: Forward, sequences_per_pair: int = 2) -> Callable[[Any, Batch], jax.Array]:
    """The jitted ``(params, batch) -> sequence log-prob sums [sequences_per_pair * P]``: the
    forward the train step runs for a frozen reference, as one pass (the reference cache)."""

    def sums(params: Any, batch: Batch) -> jax.Array:
        return forward.sequence_logps(params, batch, sequences_per_pair * batch["pair_mask"].shape[0])[1]

    return jax.jit(sums)
