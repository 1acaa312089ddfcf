"""The block-causal attention proposal gives the models' attention values and gradients on real queries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.bench.proposals import block_causal_attention
from jaxalign.models.attention import dot_product_attention, make_attention_mask
from jaxalign.data import packed_batch, plan_pack
from jaxalign.data.encoding import EncodedPair, EncodedSequence


def _pair(rng, index, prompt, chosen, rejected, vocab):
    def seq(n_completion):
        ids = rng.integers(3, vocab, prompt + n_completion).astype(np.int32)
        return EncodedSequence(ids=ids, prompt_len=prompt, has_bos=False)

    return EncodedPair(seq(chosen), seq(rejected), index)


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(0)
    pairs = [_pair(rng, i, p, c, r, 40) for i, (p, c, r) in enumerate([(5, 3, 6), (9, 2, 2), (3, 7, 4)])]
    place, taken = plan_pack([tuple(len(s) for s in p.sequences) for p in pairs], slots=4, rows=3, length=24)
    assert taken == 3
    batch = packed_batch(pairs + [None], place + [None], rows=3, length=24, pad_id=0)
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("block", [4, 7, 24])
def test_block_causal_attention_equals_the_full_form(packed, block):
    b, length = packed["segment_ids"].shape
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (b, length, 4, 8))  # 4 query heads over 2 kv heads (GQA)
    k = jax.random.normal(keys[1], (b, length, 2, 8))
    v = jax.random.normal(keys[2], (b, length, 2, 8))
    index = jnp.arange(length)
    mask = make_attention_mask(index, index, packed["segment_ids"], packed["segment_ids"], packed["positions"],
                               packed["positions"])
    full = jax.jit(lambda *a: dot_product_attention(*a, 0.35))
    blocked = jax.jit(lambda *a: block_causal_attention(*a, 0.35, block=block))
    real = np.asarray(packed["segment_ids"]) > 0  # padding queries see nothing: their output is arbitrary
    np.testing.assert_allclose(np.asarray(blocked(q, k, v, mask))[real], np.asarray(full(q, k, v, mask))[real],
                               rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real[..., None, None], f(q, k, v, mask), 0.0) ** 2)
    for a, e in zip(jax.grad(loss(blocked), (0, 1, 2))(q, k, v), jax.grad(loss(full), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5)
