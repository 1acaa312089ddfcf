"""The trainer's forward: log-probs of the scored tokens equal the model's full logits there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.data import packed_batch, plan_pack
from jaxalign.data.encoding import EncodedPair, EncodedSequence
from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.scoring import forward

VOCAB = 40


def _pair(rng, index, prompt, chosen, rejected):
    def seq(n_completion):
        ids = rng.integers(3, VOCAB, prompt + n_completion).astype(np.int32)
        return EncodedSequence(ids=ids, prompt_len=prompt, has_bos=False)

    return EncodedPair(seq(chosen), seq(rejected), index)


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(0)
    pairs = [_pair(rng, i, p, c, r) for i, (p, c, r) in enumerate([(5, 3, 6), (9, 2, 2), (3, 7, 4)])]
    place, used = plan_pack([tuple(len(s) for s in p.sequences) for p in pairs], slots=4, rows=3, length=24)
    assert len(place) == 3 and used == 3
    batch = packed_batch(pairs + [None], place + [None], rows=3, length=24, pad_id=0)
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("row_groups", [1, 3])  # the 3 rows as one group, or one group per row
@pytest.mark.parametrize("chunk", [5, 24])
def test_token_logps_equal_full_logits_on_scored_tokens_with_gradients(packed, chunk, row_groups):
    model = make_model(tiny_config("llama", vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                   max_position=24), seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    mask = packed["loss_mask"]

    def trainer(p):
        return forward.token_logps(graphdef, p, packed, chunk=chunk, row_groups=row_groups)

    def full(p):  # every position through the unembedding, no chunks
        logits = nnx.merge(graphdef, p)(packed["input_ids"], positions=packed["positions"],
                                        segment_ids=packed["segment_ids"])
        return losses.token_logps(logits, packed["input_ids"], segment_ids=packed["segment_ids"])

    got, expected = np.asarray(jax.jit(trainer)(params)), np.asarray(jax.jit(full)(params))
    scored = np.asarray(mask) > 0
    np.testing.assert_allclose(got[scored], expected[scored], rtol=1e-6, atol=1e-6)
    assert np.all(got[~scored] == 0)
    sums = lambda f: lambda p: jnp.sum(losses.segment_logps(f(p), mask, packed["sequence_ids"], num_sequences=8)[0])
    g_trainer, g_full = jax.jit(jax.grad(sums(trainer)))(params), jax.jit(jax.grad(sums(full)))(params)
    for a, b in zip(jax.tree.leaves(g_trainer), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_default_chunk_keeps_float32_logits_within_budget():
    assert forward.logits_chunk_size(1, 3072, 152064) == 110  # 64 MiB / (152064 * 4 bytes)
    assert forward.logits_chunk_size(1, 3072, 32000) == 256  # at most 256 positions over the rows
    assert forward.logits_chunk_size(6, 512, 32000) == 42  # 256 / 6 rows
    assert forward.logits_chunk_size(64, 512, 152064) == 16  # at least 16 positions
    assert forward.logits_chunk_size(1, 100, 10) == 100  # at most the row length
    assert forward.logits_chunk_size(6, 512, 32000, requested=40) == 40
