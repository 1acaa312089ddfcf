"""Log-prob utilities: label alignment, masked sums, packed segments, chunked forms, dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

B, L, V, D = 3, 7, 11, 5


def naive_token_logps(logits, ids):
    """numpy float64 reference: out[r, t] = log_softmax(logits[r, t - 1])[ids[r, t]], out[:, 0] = 0."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    out = np.zeros(ids.shape)
    for r in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[r, t] = log_softmax[r, t - 1, ids[r, t]]
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {
        "logits": rng.normal(size=(B, L, V)).astype(np.float32) * 3,
        "ids": rng.integers(0, V, size=(B, L)).astype(np.int32),
        "mask": (rng.uniform(size=(B, L)) > 0.3).astype(np.float32),
        "hidden": rng.normal(size=(B, L, D)).astype(np.float32),
        "unembedding": rng.normal(size=(D, V)).astype(np.float32),
    }


def test_shift_convention_logits_at_t_score_token_t_plus_1():
    # Logits at position t put almost all mass on token t + 1 of the sequence.
    ids = jnp.array([[4, 2, 7, 1]])
    logits = jnp.full((1, 4, 9), -30.0).at[0, jnp.arange(3), ids[0, 1:]].set(30.0)
    out = losses.token_logps(logits, ids)
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-6)  # position 0 is 0, the rest ~log 1
    # Shifted by one more position, the same logits make every later token unlikely.
    wrong = losses.token_logps(jnp.roll(logits, 1, axis=1), ids)
    assert float(jnp.max(wrong[:, 2:])) < -50


def test_token_logps_equal_naive_numpy(data):
    out = losses.token_logps(jnp.asarray(data["logits"]), jnp.asarray(data["ids"]))
    assert out.dtype == jnp.float32 and out.shape == (B, L)
    np.testing.assert_allclose(np.asarray(out), naive_token_logps(data["logits"], data["ids"]), atol=2e-6)


def test_masked_sums_and_counts_equal_naive_numpy(data):
    token = losses.token_logps(jnp.asarray(data["logits"]), jnp.asarray(data["ids"]))
    sums, counts = losses.sequence_logps(token, jnp.asarray(data["mask"]))
    naive = naive_token_logps(data["logits"], data["ids"])
    expected = [sum(naive[r, t] for t in range(L) if data["mask"][r, t]) for r in range(B)]
    np.testing.assert_allclose(np.asarray(sums), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), data["mask"].sum(-1))


def test_bf16_logits_give_float32_results(data):
    logits_bf16 = jnp.asarray(data["logits"], jnp.bfloat16)
    ids = jnp.asarray(data["ids"])
    out = losses.token_logps(logits_bf16, ids)
    chunked = losses.token_logps(logits_bf16, ids, chunk_size=3)
    assert out.dtype == jnp.float32 and chunked.dtype == jnp.float32
    # The same as float32 math on the bf16 values: no precision is lost after the cast.
    expected = naive_token_logps(np.asarray(logits_bf16.astype(jnp.float32)), data["ids"])
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(chunked), expected, atol=2e-6)
    hidden_out = losses.token_logps_from_hidden(
        jnp.asarray(data["hidden"], jnp.bfloat16), jnp.asarray(data["unembedding"], jnp.bfloat16), ids, chunk_size=4
    )
    assert hidden_out.dtype == jnp.float32


def test_float32_unembedding_gradient_is_summed_over_chunks_in_float32():
    """bfloat16 hidden states, float32 (master) unembedding, one position per chunk: each
    chunk's weight gradient is a bfloat16 product, and their sum over the 63 chunks must be a
    float32 sum (a sum in bfloat16 is off by ~1e-2 relative)."""
    rng = np.random.default_rng(3)
    length, d, v = 64, 8, 16
    hidden = jnp.asarray(rng.normal(size=(1, length, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, (1, length)), jnp.int32)
    grad = jax.grad(lambda w: jnp.sum(losses.token_logps_from_hidden(hidden, w, ids, chunk_size=1)))(w)
    assert grad.dtype == jnp.float32

    @jax.jit
    @jax.grad
    def one_position(w, t):  # the gradient of position t's chunk alone, as the loop forms it
        pair = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 2, axis=1)
        return jnp.sum(losses.token_logps_from_hidden(pair(hidden), w, pair(ids), chunk_size=2))

    parts = [np.asarray(one_position(w, t), np.float64) for t in range(length - 1)]
    expected = np.sum(parts, axis=0)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    in_bfloat16 = np.zeros_like(expected, dtype=np.float32)
    for part in parts:  # what a bfloat16 accumulator would hold
        in_bfloat16 = np.asarray(jnp.asarray(in_bfloat16 + part, jnp.bfloat16), np.float32)
    assert np.abs(in_bfloat16 - expected).max() > 20 * np.abs(np.asarray(grad) - expected).max()


def test_float64_inputs_stay_float64_with_x64(data):
    with jax.enable_x64(True):
        out = losses.token_logps(jnp.asarray(data["logits"], jnp.float64), jnp.asarray(data["ids"]))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), naive_token_logps(data["logits"], data["ids"]), atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16])
def test_chunked_logits_form_equals_unchunked_with_gradients(data, chunk_size):
    logits, ids, mask = jnp.asarray(data["logits"]), jnp.asarray(data["ids"]), jnp.asarray(data["mask"])

    @jax.jit
    def values_and_grads(lg):
        def total(x, chunk):
            return jnp.sum(losses.sequence_logps(losses.token_logps(x, ids, chunk_size=chunk), mask)[0])

        chunked = losses.token_logps(lg, ids, chunk_size=chunk_size)
        return chunked, losses.token_logps(lg, ids), jax.grad(total)(lg, chunk_size), jax.grad(total)(lg, None)

    chunked, plain, chunked_grad, plain_grad = values_and_grads(logits)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), atol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked_grad), np.asarray(plain_grad), atol=1e-6)


def test_hidden_form_equals_logits_form_with_gradients(data):
    hidden, w = jnp.asarray(data["hidden"]), jnp.asarray(data["unembedding"])
    ids, mask = jnp.asarray(data["ids"]), jnp.asarray(data["mask"])

    def chunked(h, u):
        return jnp.sum(losses.token_logps_from_hidden(h, u, ids, chunk_size=3) * mask)

    def reference(h, u):
        return jnp.sum(losses.token_logps(jnp.einsum("bld,dv->blv", h, u), ids) * mask)

    np.testing.assert_allclose(
        np.asarray(losses.token_logps_from_hidden(hidden, w, ids, chunk_size=3)),
        np.asarray(losses.token_logps(jnp.einsum("bld,dv->blv", hidden, w), ids)),
        atol=1e-5,
    )
    g_chunked = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, w)
    g_reference = jax.jit(jax.grad(reference, argnums=(0, 1)))(hidden, w)
    for a, b in zip(g_chunked, g_reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("row_groups", [None, 1, 3])  # ranked per row, over the whole batch, in 3 groups of 1 row
@pytest.mark.parametrize("chunk_size", [1, 3, L])
def test_scored_form_equals_full_form_on_scored_tokens_with_gradients(data, chunk_size, row_groups):
    hidden, w, ids = jnp.asarray(data["hidden"]), jnp.asarray(data["unembedding"]), jnp.asarray(data["ids"])
    # Row 0 scores nothing, row 1 everything, row 2 a scattered subset; packed segments on row 2.
    mask = jnp.asarray(np.stack([np.zeros(L), np.ones(L), data["mask"][2]]).astype(np.float32))
    segments = jnp.asarray([[1] * L, [1] * L, [1, 1, 1, 2, 2, 2, 0]], jnp.int32)

    def scored(h, u):
        return losses.token_logps_from_hidden(h, u, ids, chunk_size=chunk_size, segment_ids=segments, loss_mask=mask,
                                              row_groups=row_groups)

    def full(h, u):
        return losses.token_logps_from_hidden(h, u, ids, chunk_size=chunk_size, segment_ids=segments)

    got, expected = np.asarray(jax.jit(scored)(hidden, w)), np.asarray(full(hidden, w))
    scored_tokens = np.asarray(mask) > 0
    np.testing.assert_allclose(got[scored_tokens], expected[scored_tokens], atol=1e-6)
    assert np.all(got[~scored_tokens] == 0.0)
    total = lambda f: lambda h, u: jnp.sum(f(h, u) * mask)
    g_scored = jax.jit(jax.grad(total(scored), argnums=(0, 1)))(hidden, w)
    g_full = jax.jit(jax.grad(total(full), argnums=(0, 1)))(hidden, w)
    for a, b in zip(g_scored, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("row_groups", [None, 1])
def test_scored_form_never_projects_the_chunks_past_the_largest_scored_count(data, row_groups):
    # Only the first two tokens after position 0 are scored in each row, so with chunks of 2
    # only the first chunk of sorted positions may run (the first 3 over the whole batch): NaN hidden states anywhere else must not
    # reach the values or the gradients (a computed-then-masked chunk would put NaN into the
    # unembedding's gradient).
    ids, w = jnp.asarray(data["ids"]), jnp.asarray(data["unembedding"])
    mask = jnp.zeros((B, L)).at[:, 1:3].set(1.0)
    hidden = jnp.asarray(data["hidden"]).at[:, 2:].set(jnp.nan)

    def total(h, u):
        return jnp.sum(losses.token_logps_from_hidden(h, u, ids, chunk_size=2, loss_mask=mask, row_groups=row_groups)
                       * mask)

    value, (g_hidden, g_unembedding) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(hidden, w)
    expected = losses.token_logps_from_hidden(jnp.asarray(data["hidden"]), w, ids, chunk_size=2)
    np.testing.assert_allclose(float(value), float(jnp.sum(expected * mask)), rtol=1e-6)
    assert np.isfinite(np.asarray(g_unembedding)).all()
    assert np.isfinite(np.asarray(g_hidden)[:, :2]).all() and np.all(np.asarray(g_hidden)[:, 2:] == 0)


def _largest_f32_array(lowered_text):
    sizes = [int(np.prod([int(d) for d in dims.split("x")])) for dims in re.findall(r"tensor<([\dx]+)xf32>", lowered_text)]
    return max(sizes)


def test_chunked_forms_never_build_a_float32_batch_length_vocab_array():
    # Forward and backward, as lowered by jit: no float32 array as large as [B, L, V].
    b, length, d, v, chunk = 2, 12, 5, 37, 4
    hidden = jnp.ones((b, length, d), jnp.bfloat16)
    w = jnp.ones((d, v), jnp.bfloat16)
    ids = jnp.zeros((b, length), jnp.int32)

    for loss_mask in (None, jnp.ones((b, length))):

        def from_hidden(h, u):
            return jnp.sum(losses.token_logps_from_hidden(h, u, ids, chunk_size=chunk, loss_mask=loss_mask))

        text = jax.jit(jax.value_and_grad(from_hidden, argnums=(0, 1))).lower(hidden, w).as_text()
        assert _largest_f32_array(text) <= b * chunk * v < b * length * v

    logits = jnp.ones((b, length, v), jnp.bfloat16)
    text = jax.jit(jax.value_and_grad(lambda lg: jnp.sum(losses.token_logps(lg, ids, chunk_size=chunk)))).lower(
        logits
    ).as_text()
    assert _largest_f32_array(text) <= b * chunk * v
    # Sanity check of the probe: the unchunked form does build it.
    text = jax.jit(jax.value_and_grad(lambda lg: jnp.sum(losses.token_logps(lg, ids)))).lower(logits).as_text()
    assert _largest_f32_array(text) >= b * length * v


def test_segment_ids_zero_the_first_token_of_each_packed_segment(data):
    logits, ids = jnp.asarray(data["logits"][:1]), jnp.asarray(data["ids"][:1])
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    out = np.asarray(losses.token_logps(logits, ids, segment_ids=segments))
    plain = np.asarray(losses.token_logps(logits, ids))
    assert out[0, 0] == 0.0 and out[0, 3] == 0.0 and out[0, 5] == 0.0
    np.testing.assert_array_equal(out[0, [1, 2, 4, 6]], plain[0, [1, 2, 4, 6]])


def test_segment_sum_form_on_packed_rows_equals_per_row_form():
    # Two pairs (four sequences) of different lengths, laid out unpacked (one per row, right
    # padded) and packed (two per row). Logits depend only on (sequence, position in it).
    rng = np.random.default_rng(1)
    lengths = [4, 3, 5, 2]  # chosen 0, chosen 1, rejected 0, rejected 1 -> sequence ids 0..3
    seqs = [rng.integers(0, V, n) for n in lengths]
    seq_logits = [rng.normal(size=(n, V)).astype(np.float32) for n in lengths]
    seq_masks = [np.r_[0.0, np.ones(n - 1)] for n in lengths]  # every token but the first counts

    def layout(rows, width):
        ids = np.zeros((len(rows), width), np.int32)
        logits = np.zeros((len(rows), width, V), np.float32)
        mask = np.zeros((len(rows), width), np.float32)
        segment = np.zeros((len(rows), width), np.int32)
        sequence = -np.ones((len(rows), width), np.int32)
        for r, members in enumerate(rows):
            start = 0
            for k, s in enumerate(members):
                n = lengths[s]
                ids[r, start : start + n] = seqs[s]
                logits[r, start : start + n] = seq_logits[s]
                mask[r, start : start + n] = seq_masks[s]
                segment[r, start : start + n] = k + 1
                sequence[r, start : start + n] = s
                start += n
        return [jnp.asarray(x) for x in (logits, ids, mask, segment, sequence)]

    @jax.jit
    def per_row(logits, ids, mask, segment):
        return losses.sequence_logps(losses.token_logps(logits, ids, segment_ids=segment), mask)

    @jax.jit
    def per_id(logits, ids, mask, segment, sequence):
        token = losses.token_logps(logits, ids, segment_ids=segment)
        return losses.segment_logps(token, mask, sequence, num_sequences=4)

    unpacked = layout([[0], [1], [2], [3]], width=6)
    row_sums, row_counts = per_row(*unpacked[:4])
    id_sums, _ = per_id(*unpacked)
    np.testing.assert_allclose(np.asarray(id_sums), np.asarray(row_sums), atol=1e-6)

    packed_sums, packed_counts = per_id(*layout([[0, 3], [2, 1]], width=9))
    np.testing.assert_allclose(np.asarray(packed_sums), np.asarray(row_sums), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(packed_counts), np.asarray(row_counts))
    np.testing.assert_array_equal(np.asarray(packed_counts), [n - 1 for n in lengths])


def test_align_logits_to_labels_matches_token_logps(data):
    logits, ids = jnp.asarray(data["logits"]), jnp.asarray(data["ids"])
    aligned = losses.align_logits_to_labels(logits)
    assert aligned.shape == logits.shape
    gathered = jnp.take_along_axis(jax.nn.log_softmax(aligned), ids[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(
        np.asarray(gathered[:, 1:]), np.asarray(losses.token_logps(logits, ids)[:, 1:]), atol=1e-6
    )


def test_bad_inputs_raise_clear_errors(data):
    logits, ids = jnp.asarray(data["logits"]), jnp.asarray(data["ids"])
    with pytest.raises(ValueError, match=r"token_logps: input_ids must have shape \[3, 7\], got \[3, 6\]"):
        losses.token_logps(logits, ids[:, :6])
    with pytest.raises(ValueError, match=r"token_logps: input_ids must be integer token ids"):
        losses.token_logps(logits, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"token_logps: chunk_size must be a positive int, got 0"):
        losses.token_logps(logits, ids, chunk_size=0)
    with pytest.raises(ValueError, match=r"token_logps_from_hidden: need hidden \[batch, length, d_model\]"):
        losses.token_logps_from_hidden(jnp.zeros((B, L, D)), jnp.zeros((D + 1, V)), ids, chunk_size=2)
    with pytest.raises(ValueError, match=r"sequence_logps: .*must have the same shape"):
        losses.sequence_logps(jnp.zeros((B, L)), jnp.zeros((B, L + 1)))
    with pytest.raises(ValueError, match=r"token_logps_from_hidden: segment_ids must have shape \[3, 7\], got \[3, 6\]"):
        losses.token_logps_from_hidden(
            jnp.zeros((B, L, D)), jnp.zeros((D, V)), ids, chunk_size=2, segment_ids=jnp.ones((B, L - 1), jnp.int32)
        )
    with pytest.raises(ValueError, match=r"token_logps_from_hidden: loss_mask must have shape \[3, 7\], got \[3, 6\]"):
        losses.token_logps_from_hidden(
            jnp.zeros((B, L, D)), jnp.zeros((D, V)), ids, chunk_size=2, loss_mask=jnp.ones((B, L - 1))
        )
    with pytest.raises(ValueError, match=r"segment_logps: .*sequence_ids \[3, 6\] must have the same shape"):
        losses.segment_logps(jnp.zeros((B, L)), jnp.zeros((B, L)), jnp.zeros((B, L - 1), jnp.int32), num_sequences=2)
