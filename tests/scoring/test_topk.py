"""``teacher_topk`` and ``candidate_logps`` equal the full-logits computation, label-aligned, in
padded and packed batches, with several chunks, row groups and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.data import EncodedPair, EncodedSequence, packed_batch, padded_batch, plan_pack
from jaxalign.losses import align_logits_to_labels
from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.scoring.forward import Forward
from jaxalign.scoring.topk import candidate_logps, teacher_topk, teacher_topk_fn

VOCAB, K = 320, 6


@pytest.fixture(scope="module")
def model():
    """A tiny Llama with O(0.3) perturbed weights: peaked, tie-free next-token distributions."""
    model = make_model(tiny_config("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                   intermediate_size=64, max_position=64), seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(treedef, [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
    return graphdef, params


def _pairs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    seq = lambda n: EncodedSequence(rng.integers(1, VOCAB, n).astype(np.int32), n // 3 + 1, False)
    return [EncodedPair(seq(c), seq(r), i) for i, (c, r) in enumerate(lengths)]


LENGTHS = [(9, 14), (20, 5), (7, 7)]


def _batches():
    pairs = _pairs(LENGTHS)
    padded = padded_batch(pairs + [None], length=24, pad_id=0)  # one filler slot
    place, rows = plan_pack([(c, r) for c, r in LENGTHS], slots=3, rows=4, length=24)
    packed = packed_batch(pairs, place, rows=4, length=24, pad_id=0)
    return {"padded": padded, "packed": packed}


def _full_logps(graphdef, params, batch):
    """Label-aligned float32 log-softmax ``[R, L, V]`` from the model's full logits."""
    model = nnx.merge(graphdef, params)
    logits = model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                   segment_ids=jnp.asarray(batch["segment_ids"]))
    return jax.nn.log_softmax(align_logits_to_labels(logits), axis=-1)


def _scored(batch):
    """The scored tokens: ``loss_mask > 0`` and not the first token of a segment (host arrays)."""
    segments = np.asarray(batch["segment_ids"])
    starts = np.concatenate([np.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return (np.asarray(batch["loss_mask"]) > 0) & ~starts


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("chunk, row_groups", [(0, 1), (3, 2)])
def test_teacher_topk_equals_top_k_of_the_full_softmax(model, layout, chunk, row_groups):
    graphdef, params = model
    batch = _batches()[layout]
    ids, probs = teacher_topk(Forward(graphdef, chunk=chunk, row_groups=row_groups), params,
                              jax.tree.map(jnp.asarray, batch), K)
    logps, scored = _full_logps(graphdef, params, batch), _scored(batch)
    want_probs, want_ids = jax.lax.top_k(jax.nn.softmax(logps, axis=-1), K)
    assert ids.dtype == jnp.int32 and probs.dtype == jnp.float32 and ids.shape == (*batch["input_ids"].shape, K)
    assert scored.sum() > 0 and not np.any(np.asarray(ids)[~scored]) and not np.any(np.asarray(probs)[~scored])
    np.testing.assert_array_equal(np.asarray(ids)[scored], np.asarray(want_ids)[scored])
    np.testing.assert_allclose(np.asarray(probs)[scored], np.asarray(want_probs)[scored], rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(np.asarray(probs)[scored], axis=-1) <= 0)  # most probable first


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_candidate_logps_equal_the_full_log_softmax_gathered_with_gradients(model, layout):
    graphdef, params = model
    batch = jax.tree.map(jnp.asarray, _batches()[layout])
    ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (*batch["input_ids"].shape, K)), jnp.int32)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal(ids.shape), jnp.float32)
    scored = _scored(batch)

    def chunked(p):
        return candidate_logps(Forward(graphdef, chunk=2, row_groups=2), p, batch, ids)

    def full(p):
        logps = _full_logps(graphdef, p, batch)
        return jnp.where(scored[..., None], jnp.take_along_axis(logps, ids, axis=-1), 0.0)

    got, want = jax.jit(chunked)(params), jax.jit(full)(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got)[~scored])
    g_got = jax.jit(jax.grad(lambda p: jnp.sum(chunked(p) * weights)))(params)
    g_want = jax.jit(jax.grad(lambda p: jnp.sum(full(p) * weights)))(params)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_jitted_pass_and_bad_inputs(model):
    graphdef, params = model
    batch = jax.tree.map(jnp.asarray, {k: v for k, v in _batches()["padded"].items() if k != "example_index"})
    ids, probs = teacher_topk_fn(Forward(graphdef), K)(params, batch)
    assert ids.shape == probs.shape and float(np.asarray(probs).sum(-1).max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="k = 400 must be in"):
        teacher_topk(Forward(graphdef), params, batch, 400)
    with pytest.raises(ValueError, match="ids must be integer"):
        candidate_logps(Forward(graphdef), params, batch, probs)
