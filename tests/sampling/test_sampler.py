"""The sampler: exact greedy, the model's log-probs, the right distribution, seeds that do not
depend on the batch, bucket or devices, a shared prefill, stop ids, and parameters read in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from jaxalign import parallel
from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.sampling import FINISH_LENGTH, FINISH_STOP, SamplingConfig, decode, filter_logits, sample
from jaxalign.sampling.sampler import _compiled

V, T = 64, 5
LENGTHS = (3, 7, 5, 12, 9, 4)


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config("llama", vocab_size=V, hidden_size=32, max_position=64, num_kv_heads=2), seed=3)


@pytest.fixture(scope="module")
def parts(model):
    return nnx.split(model)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(1, V, n).astype(np.int32) for n in LENGTHS]


@pytest.fixture(scope="module")
def forward(parts):
    graphdef, params = parts
    return jax.jit(lambda ids: nnx.merge(graphdef, params)(ids, jnp.ones_like(ids)))


def _config(**kw):
    return SamplingConfig(**{"max_new_tokens": T, "buckets": (8, 16), "batch_size": 4, **kw})


def test_greedy_equals_a_full_forward_argmax_loop(parts, prompts, forward):
    out = sample(*parts, prompts, _config(temperature=0.0, num_samples=2))
    assert out.tokens.shape == (len(prompts), 2, T) and (out.finish == FINISH_LENGTH).all()
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(T):
            seq.append(int(jnp.argmax(forward(jnp.asarray([seq]))[0, -1])))
        for s in range(2):
            assert out.tokens[i, s].tolist() == seq[len(prompt):], (i, s)


def test_logps_are_the_unmodified_models_log_probs_of_the_sampled_tokens(parts, prompts, forward):
    out = sample(*parts, prompts, _config(temperature=1.7, top_k=5, top_p=0.9, num_samples=2, seed=3))
    for i, prompt in enumerate(prompts):
        for s in range(2):
            seq = np.concatenate([prompt, out.tokens[i, s]])
            logp = jax.nn.log_softmax(forward(jnp.asarray([seq]))[0], axis=-1)
            want = [float(logp[len(prompt) - 1 + t, seq[len(prompt) + t]]) for t in range(T)]
            np.testing.assert_allclose(out.logps[i, s], want, atol=1e-5)


def test_first_token_frequencies_match_the_filtered_softmax(parts, prompts, forward):
    """4000 samples of one prompt's first token against ``softmax(filter(logits / 1.5))``:
    each token's frequency within 4.5 standard errors (+ 0.002) of its probability."""
    n = 4000
    out = sample(*parts, prompts[:1], _config(max_new_tokens=1, temperature=1.5, top_k=8, top_p=0.9, num_samples=n,
                                              batch_size=1))
    logits = forward(jnp.asarray(prompts[:1]))[0, -1]
    want = np.asarray(jax.nn.softmax(filter_logits(logits / 1.5, top_k=8, top_p=0.9)))
    got = np.bincount(out.tokens[0, :, 0], minlength=V) / n
    assert 2 <= np.count_nonzero(want) <= 8 and got[want == 0].sum() == 0
    np.testing.assert_array_less(np.abs(got - want), 4.5 * np.sqrt(want * (1 - want) / n) + 0.002)


def test_same_seed_same_samples_whatever_the_batch_bucket_and_devices(parts, prompts):
    graphdef, params = parts
    config = _config(temperature=1.0, num_samples=3, seed=11)
    base = sample(graphdef, params, prompts, config)
    order = [4, 0, 5, 2, 1, 3]
    regrouped = sample(graphdef, params, [prompts[i] for i in order], _config(temperature=1.0, num_samples=3, seed=11,
                       batch_size=5, buckets=(16,)), prompt_indices=order)
    one_at_a_time = sample(graphdef, params, prompts, _config(temperature=1.0, num_samples=3, seed=11, batch_size=1))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = jax.device_put(params, parallel.param_shardings(params, mesh))
    on_8 = sample(graphdef, sharded, prompts, config, mesh=mesh)
    for name, other in (("regrouped", regrouped), ("one at a time", one_at_a_time), ("8 devices", on_8)):
        tokens = other.tokens if name != "regrouped" else other.tokens[np.argsort(order)]
        np.testing.assert_array_equal(tokens, base.tokens, err_msg=name)
    assert len({tuple(t.ravel()) for t in base.tokens[0]}) == 3  # the samples of a prompt differ
    assert (sample(graphdef, params, prompts, _config(temperature=1.0, num_samples=3, seed=12)).tokens
            != base.tokens).any()


def test_a_shared_prefill_equals_prefilling_each_copy(parts, prompts):
    graphdef, params = parts
    ids = np.zeros((3, 12), np.int32)
    mask = np.zeros((3, 12), np.int32)
    for row, p in enumerate(prompts[:3]):
        ids[row, 12 - len(p):], mask[row, 12 - len(p):] = p, 1
    keys = jax.random.split(jax.random.key(5), 9)
    run = jax.jit(decode, static_argnames=("graphdef", "max_new_tokens", "num_samples"))
    shared = run(graphdef, params, ids, mask, keys, jnp.float32(1.0), jnp.float32(1.0), max_new_tokens=T,
                 num_samples=3)
    copies = run(graphdef, params, np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0), keys, jnp.float32(1.0),
                 jnp.float32(1.0), max_new_tokens=T, num_samples=1)
    np.testing.assert_array_equal(shared.tokens, copies.tokens)
    np.testing.assert_allclose(shared.logps, copies.logps, atol=1e-6)


def test_stop_ids_end_rows_with_their_reason_even_when_pad_is_the_stop_id(parts, prompts):
    graphdef, params = parts
    greedy = sample(graphdef, params, prompts, _config(temperature=0.0))
    stop = int(greedy.tokens[0, 0, 1])
    out = sample(graphdef, params, prompts, _config(temperature=0.0, stop_ids=(stop, V + 3), pad_id=stop))
    for i in range(len(prompts)):
        row = greedy.tokens[i, 0]
        hits = np.flatnonzero(row == stop)
        n = hits[0] + 1 if hits.size else T  # the stop token itself is kept
        assert out.mask[i, 0].tolist() == [1] * n + [0] * (T - n)
        assert out.tokens[i, 0, :n].tolist() == row[:n].tolist()
        assert out.finish[i, 0] == (FINISH_STOP if hits.size else FINISH_LENGTH)
        assert (out.logps[i, 0, n:] == 0).all()
    assert out.finish[0, 0] == FINISH_STOP


def test_sharded_parameters_are_read_in_place_and_settings_do_not_recompile(parts, prompts):
    """On a data x fsdp mesh the program takes the parameters with their own shardings (no
    copy, no gather), leaves them alive, and temperature / top-p are traced values."""
    graphdef, params = parts
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = jax.device_put(params, parallel.param_shardings(params, mesh))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded))
    pointers = [leaf.addressable_shards[0].data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(sharded)]
    before = _compiled._cache_size()
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8), (0.0, 0.5)):
        sample(graphdef, sharded, prompts, _config(temperature=temperature, top_p=top_p), mesh=mesh)
    assert _compiled._cache_size() - before <= 2  # one program per bucket (8 and 16)
    assert [leaf.addressable_shards[0].data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(sharded)] == pointers
    rows = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(np.zeros((8, 8), np.int32), rows), jax.device_put(np.ones((8, 8), np.int32), rows),
            jax.device_put(np.zeros((8,), np.int32), rows), jnp.uint32(0), jnp.float32(1.0), jnp.float32(1.0)]
    compiled = _compiled.lower(graphdef, sharded, *args, max_new_tokens=T, num_samples=1, top_k=None, stop_ids=(),
                               pad_id=0).compile()
    param_shardings = jax.tree.leaves(compiled.input_shardings[0][0])  # graphdef is static: params come first
    for leaf, sharding in zip(jax.tree.leaves(sharded), param_shardings, strict=True):
        assert sharding.is_equivalent_to(leaf.sharding, leaf.ndim)


def test_bad_prompts_and_settings_are_errors(parts, prompts):
    with pytest.raises(ValueError, match="longer than the largest bucket 16"):
        sample(*parts, [np.arange(1, 20, dtype=np.int32)], _config())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(*parts, [prompts[0], np.zeros((0,), np.int32)], _config())
    for kw, match in ((dict(num_samples=0), "num_samples"), (dict(top_p=1.5), "top_p"),
                      (dict(temperature=-1.0), "temperature"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            _config(**kw)
