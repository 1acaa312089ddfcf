"""An example's per-token log-probs do not depend on padding side or on being packed with others."""

import jax.numpy as jnp
import numpy as np

from jaxalign.models.attention import positions_from_segments, resolve_positions_and_segments

A = np.array([5, 17, 3, 40, 22, 9, 31])  # 7 tokens
B = np.array([11, 2, 60, 7, 33])  # 5 tokens
L = 10
TOL = 1e-5


def _alone(model, logps_of, seq):
    ids = jnp.asarray(seq[None])
    return np.asarray(logps_of(model(ids), ids))[0]


def _padded(model, logps_of, side):
    ids = np.zeros((2, L), np.int32)
    mask = np.zeros((2, L), np.int32)
    for row, seq in enumerate((A, B)):
        sl = slice(0, len(seq)) if side == "right" else slice(L - len(seq), L)
        ids[row, sl], mask[row, sl] = seq, 1
    lp = np.asarray(logps_of(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(ids)))
    out = []
    for row, seq in enumerate((A, B)):
        start = 0 if side == "right" else L - len(seq)
        out.append(lp[row, start:start + len(seq) - 1])
    return out


def test_padding_side_does_not_change_logps(family_model, logps_of):
    name, _, model = family_model
    alone = [_alone(model, logps_of, A), _alone(model, logps_of, B)]
    for side in ("right", "left"):
        for got, want in zip(_padded(model, logps_of, side), alone):
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=f"{name} {side} padding")


def test_packing_does_not_change_logps(family_model, logps_of):
    name, _, model = family_model
    row = np.concatenate([A, B, [0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * len(A) + [2] * len(B) + [0, 0]], np.int32)
    positions = np.array([list(range(len(A))) + list(range(len(B))) + [0, 0]], np.int32)
    ids = jnp.asarray(row)
    explicit = model(ids, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    derived = model(ids, segment_ids=jnp.asarray(segments))  # positions derived from segments
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(derived))
    assert np.isfinite(np.asarray(explicit)).all()  # padding rows attend to nothing, stay finite
    lp = np.asarray(logps_of(explicit, ids))[0]
    np.testing.assert_allclose(lp[: len(A) - 1], _alone(model, logps_of, A), rtol=0, atol=TOL, err_msg=name)
    # B's first token is not scored; its labels start at row index len(A) + 1.
    np.testing.assert_allclose(lp[len(A): len(A) + len(B) - 1], _alone(model, logps_of, B), rtol=0, atol=TOL,
                               err_msg=name)


def test_packing_blocks_cross_segment_attention(make_tiny, jit_model, logps_of):
    """Changing the first packed sequence must not change the second one's log-probs."""
    model = jit_model(make_tiny("llama"))
    segments = jnp.asarray([[1] * len(A) + [2] * len(B)])
    lp = []
    for first in (A, A[::-1]):
        ids = jnp.asarray(np.concatenate([first, B])[None])
        lp.append(np.asarray(logps_of(model(ids, segment_ids=segments), ids))[0, len(A):])
    np.testing.assert_array_equal(lp[0], lp[1])
    # While without segment ids (one sequence) it does change: the check above is not vacuous.
    ids0, ids1 = (jnp.asarray(np.concatenate([f, B])[None]) for f in (A, A[::-1]))
    a0 = np.asarray(logps_of(model(ids0), ids0))[0, len(A):]
    a1 = np.asarray(logps_of(model(ids1), ids1))[0, len(A):]
    assert np.abs(a0 - a1).max() > 1e-4


def test_positions_and_segments_from_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions, segments = resolve_positions_and_segments(jnp.zeros((2, 5), jnp.int32), mask)
    np.testing.assert_array_equal(np.asarray(positions), [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(segments), np.asarray(mask))
    packed = positions_from_segments(jnp.asarray([[1, 1, 2, 2, 2, 3, 0]]))
    np.testing.assert_array_equal(np.asarray(packed), [[0, 1, 0, 1, 2, 0, 0]])
