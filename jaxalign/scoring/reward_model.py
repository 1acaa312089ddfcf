"""Scoring (prompt, completion) texts with a reward model: an HF sequence-classification checkpoint.

``RewardModel.load(dir)`` reads a ``*ForSequenceClassification`` checkpoint with ``num_labels=1``
(a ``bradley_terry`` run's ``WORKDIR/export``, or one ``transformers`` wrote) and its tokenizer,
without downloading anything. ``score(prompts, completions)`` returns
``r(x, y) = h_last . w`` per item, float32, in input order: ``h_last`` is the final hidden state
at the sequence's last token (``scoring.forward.sequence_rewards``, the training forward).

* **Tokenization.** Texts are re-tokenized with the reward model's own tokenizer by the data
  package's ``Encoder``, exactly as a Bradley-Terry training sequence: a conversational prompt
  (a message list) goes through the chat template with the completion as an assistant
  message; BOS as the tokenizer adds it; the completion ends with EOS, where the reward is read.
* **Batches.** Items are sorted by length, ``batch_size`` per call, each call right-padded to
  the smallest bucket that fits its longest item (the last call is filled with empty rows), so
  one program is compiled per ``(batch_size, bucket)``. Masks, not pad ids, locate the last
  token, so scores do not depend on the batch, the bucket or the order of the items.
* **Mesh.** With ``mesh``, the parameters are placed by ``jaxalign.parallel``'s logical-axis
  rules and each call's rows are split over the ``("data", "fsdp")`` axes (``batch_size`` is
  rounded up to a multiple of their size); every process passes the same full lists and gets
  all scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import parallel
from jaxalign.data.batching import bucket_length, padded_batch
from jaxalign.data.encoding import EncodedExample, EncodedSequence, Encoder
from jaxalign.data.records import FieldError, Text
from jaxalign.models.config import ModelConfig
from jaxalign.models.hf_reward import load_reward_model
from jaxalign.scoring.forward import sequence_rewards
from jaxalign.tokenizers import load_tokenizer

__all__ = ["RewardModel"]

FORWARD_KEYS = ("input_ids", "positions", "segment_ids", "sequence_ids")
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


class RewardModel:
    """A reward model's decoder (``graphdef``, ``params`` as ``nnx.split(model, nnx.Param)`` gives
    them, placed on ``mesh`` if any), head kernel ``[D]``, tokenizer and ``ModelConfig``, and
    its jitted batched forward (see the module docstring; ``load`` builds one from a directory)."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, head: np.ndarray | jax.Array, tokenizer: Any,
                 config: ModelConfig, *, mesh: Mesh | None = None, batch_size: int = 16,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive lengths, got {buckets}")
        split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.graphdef, self.params, self.tokenizer, self.config = graphdef, params, tokenizer, config
        self.mesh, self.batch_size, self.buckets = mesh, -(-batch_size // split) * split, tuple(sorted(buckets))
        self.encoder = Encoder(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.encoder.eos_id
        self.head = {"kernel": self._replicated(np.asarray(head, np.float32))}
        out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        self._forward = jax.jit(self._rewards, out_shardings=out)

    @classmethod
    def load(cls, path: str, *, mesh: Mesh | None = None, dtype: str = "float32", batch_size: int = 16,
             buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> RewardModel:
        """The reward model in the local checkpoint directory ``path`` (with its tokenizer files);
        ``dtype`` is the compute and parameter dtype (the head and the scores stay float32)."""
        tokenizer = load_tokenizer(path)
        sharding_fn = None if mesh is None else parallel.sharding_fn(mesh)
        model, head = load_reward_model(path, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                                        sharding_fn=sharding_fn)
        graphdef, params = nnx.split(model, nnx.Param)
        return cls(graphdef, params, head, tokenizer, model.config, mesh=mesh, batch_size=batch_size, buckets=buckets)

    def _rewards(self, params: Any, head: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
        return sequence_rewards(self.graphdef, params, head, batch, num_sequences=batch["input_ids"].shape[0])

    def _replicated(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda i: x[i])

    def _rows(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, parallel.batch_sharding(self.mesh), lambda i: x[i])

    def encode(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[EncodedSequence]:
        """Each item as a Bradley-Terry training sequence of the reward model's tokenizer;
        ``ValueError`` naming the item for a bad one or one too long to score."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        limit = min(self.buckets[-1], self.config.max_position)
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if not isinstance(completion, str):
                raise ValueError(f"item {i}: the completion must be a string, got {type(completion).__name__}")
            turn = completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]
            try:
                seq = self.encoder.encode_sequence(prompt, turn, field="completion")
            except FieldError as e:
                raise ValueError(f"item {i}: {e}") from None
            if len(seq) > limit:
                raise ValueError(
                    f"item {i} is {len(seq)} tokens long, more than the {limit} this reward model scores (largest "
                    f"bucket {self.buckets[-1]}, {self.config.max_position} positions); shorten it or pass larger "
                    "buckets"
                )
            out.append(seq)
        return out

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> np.ndarray:
        """Float32 rewards ``[N]`` of the (prompt, completion) items, in input order."""
        sequences = self.encode(prompts, completions)
        scores = np.zeros((len(sequences),), np.float32)
        order = np.argsort([len(s) for s in sequences], kind="stable")
        for start in range(0, len(order), self.batch_size):
            chosen = order[start: start + self.batch_size]
            slots = [EncodedExample(sequences[i], int(i)) for i in chosen]
            slots += [None] * (self.batch_size - len(slots))
            length = bucket_length(max(len(sequences[i]) for i in chosen), self.buckets)
            batch = padded_batch(slots, length=length, pad_id=self.pad_id, sequences_per_slot=1)
            rewards = self._forward(self.params, self.head, {k: self._rows(batch[k]) for k in FORWARD_KEYS})
            scores[chosen] = np.asarray(rewards.addressable_data(0))[: len(chosen)]
        return scores
