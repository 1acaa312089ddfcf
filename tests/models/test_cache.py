"""The KV-cache path (prefill + one-token decode) gives the logits of a full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models.attention import positions_from_segments

PROMPT, NEW = 6, 4
TOL = 1e-5


def _left_padded_batch():
    rng = np.random.RandomState(3)
    ids = rng.randint(1, 64, (3, PROMPT + NEW)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


def test_prefill_and_decode_match_full_forward(family_model):
    name, model, forward = family_model
    ids, mask = _left_padded_batch()
    full = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)))

    graphdef, params = nnx.split(model)

    @jax.jit
    def decode(params, tokens, cache, positions, segments):
        return nnx.merge(graphdef, params).decode(tokens, cache, positions=positions, segment_ids=segments)

    segments = jnp.asarray(mask[:, :PROMPT])
    cache = model.init_cache(3, PROMPT + NEW)
    logits, cache = decode(params, jnp.asarray(ids[:, :PROMPT]), cache, positions_from_segments(segments), segments)
    real = mask[:, :PROMPT] == 1
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :PROMPT][real], rtol=0, atol=TOL, err_msg=name)

    next_pos = segments.sum(-1)
    for j in range(NEW):
        token = jnp.asarray(ids[:, PROMPT + j: PROMPT + j + 1])
        logits, cache = decode(params, token, cache, (next_pos + j)[:, None], jnp.ones_like(token))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, PROMPT + j], rtol=0, atol=TOL,
                                   err_msg=f"{name} step {j}")
    assert int(cache.index) == PROMPT + NEW


def test_cache_overflow_is_an_error(make_tiny):
    model = make_tiny("llama")
    cache = model.init_cache(1, 2)
    ones = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.decode(ones, cache, positions=jnp.arange(3)[None], segment_ids=ones)


def test_models_of_one_config_share_a_graphdef(make_tiny):
    """Static structure only (no per-instance closures), so jitted steps and generate compile once."""
    for name in ("llama", "gpt2"):
        g1, _ = nnx.split(make_tiny(name, seed=0))
        g2, _ = nnx.split(make_tiny(name, seed=1))
        assert g1 == g2 and hash(g1) == hash(g2), name
