"""Per-token side arrays reach the row and column of their token: padded, packed, pad_batch, stacking."""

from dataclasses import replace

import numpy as np
import pytest

from jaxalign.data import (
    BATCH_KEYS,
    EncodedExample,
    EncodedPair,
    EncodedSequence,
    packed_batch,
    pad_batch,
    padded_batch,
    plan_pack,
    stack_micro_batches,
)


def _probs(ids, pos, index):
    """float32 ``[...]``: exact (small integers and quarters)."""
    return (ids + pos / 4 + 100 * index).astype(np.float32)


def _topk(ids, pos, index):
    """int32 ``[..., 3]``."""
    return (10 * ids[..., None] + np.arange(3) + 1000 * pos[..., None] + 100_000 * index[..., None]).astype(np.int32)


SIDE = {"probs": _probs, "topk": _topk}
KEYS = BATCH_KEYS + ("probs", "topk")


def _seq(rng, n, index, side=SIDE):
    ids = rng.integers(3, 100, n).astype(np.int32)
    pos, idx = np.arange(n), np.full(n, index)
    return EncodedSequence(ids, n // 2, False, side={k: f(ids, pos, idx) for k, f in side.items()})


def _pairs(lengths, side=SIDE, seed=0):
    """Pairs with example indices 10, 11, ... (not their slot numbers)."""
    rng = np.random.default_rng(seed)
    return [EncodedPair(_seq(rng, c, 10 + i, side), _seq(rng, r, 10 + i, side), 10 + i)
            for i, (c, r) in enumerate(lengths)]


def _check_side(batch):
    """At every token the side value is SIDE's function of (input_ids, positions, example index); 0 elsewhere."""
    token = batch["segment_ids"] > 0
    slot = np.where(token, batch["sequence_ids"] % batch["pair_mask"].shape[0], 0)
    index = batch["example_index"][slot]
    for key, f in SIDE.items():
        want = f(batch["input_ids"], batch["positions"], index)
        want = np.where(token.reshape(token.shape + (1,) * (want.ndim - 2)), want, 0).astype(want.dtype)
        assert batch[key].dtype == want.dtype and batch[key].shape == want.shape, key
        np.testing.assert_array_equal(batch[key], want, err_msg=key)


def test_padded_batch_carries_side_arrays():
    pairs = _pairs([(5, 7), (9, 4), (6, 6)])
    batch = padded_batch(pairs + [None], length=12, pad_id=2)
    assert tuple(batch) == KEYS
    assert batch["probs"].shape == (8, 12) and batch["topk"].shape == (8, 12, 3)
    _check_side(batch)
    singles = [EncodedExample(p.chosen, p.index) for p in pairs]
    _check_side(padded_batch([None] + singles, length=10, pad_id=2))


def test_packed_batch_carries_side_arrays():
    pairs = _pairs([(5, 7), (9, 4), (6, 6), (3, 8), (2, 5)])
    places, used = plan_pack([tuple(map(len, p.sequences)) for p in pairs], slots=5, rows=4, length=16)
    assert len(places) == 5
    batch = packed_batch(pairs + [None], places + [None], rows=used, length=16, pad_id=2)
    assert tuple(batch) == KEYS
    assert max(len(set(r[r > 0].tolist())) for r in batch["segment_ids"]) >= 3  # several sequences per row
    _check_side(batch)


def test_pad_batch_pads_side_arrays_only_along_tokens():
    batch = padded_batch(_pairs([(5, 7), (9, 4)]), length=10, pad_id=2)
    wider = pad_batch(batch, rows=6, length=14, pad_id=2)
    assert wider["probs"].shape == (6, 14) and wider["topk"].shape == (6, 14, 3)
    for key in ("pair_mask", "example_index"):  # [P] per-slot arrays are not token arrays
        np.testing.assert_array_equal(wider[key], batch[key])
    _check_side(wider)


def test_stack_micro_batches_pads_and_stacks_side_arrays():
    padded = padded_batch(_pairs([(5, 7), (9, 4)], seed=1), length=10, pad_id=2)  # [4, 10]
    pairs = _pairs([(5, 7), (9, 4)], seed=2)
    places, used = plan_pack([tuple(map(len, p.sequences)) for p in pairs], slots=2, rows=4, length=16)
    packed = packed_batch(pairs, places, rows=used, length=16, pad_id=2)  # [2, 16]
    stacked = stack_micro_batches([padded, packed], pad_id=2)
    assert tuple(stacked) == KEYS
    assert stacked["input_ids"].shape == (2, 4, 16) and stacked["topk"].shape == (2, 4, 16, 3)
    assert stacked["pair_mask"].shape == (2, 2)
    for a in range(2):
        _check_side({k: v[a] for k, v in stacked.items()})
    with pytest.raises(ValueError, match=r"micro-batch 1 has keys \[.*\], expected \[.*'probs'"):
        stack_micro_batches([padded, padded_batch(_pairs([(5, 7)], side={}), length=10, pad_id=2)])


def test_side_arrays_must_agree_across_the_batch():
    good = _pairs([(5, 7)])[0]
    seq, side = good.chosen, good.chosen.side
    lacking = _pairs([(5, 7), (4, 4)], side={"probs": _probs})[1]  # example 11
    with pytest.raises(ValueError, match=r"example 11: side array 'topk' is missing, "
                                         r"in the batch's first sequence \[n, 3\] int32"):
        padded_batch([good, lacking], length=10, pad_id=2)
    narrow = replace(seq, side={**side, "topk": side["topk"][:, :2]})
    with pytest.raises(ValueError, match=r"example 10: side array 'topk' is \[n, 2\] int32, .* \[n, 3\] int32"):
        padded_batch([EncodedPair(seq, narrow, 10)], length=10, pad_id=2)
    half = replace(seq, side={**side, "probs": side["probs"].astype(np.float16)})
    with pytest.raises(ValueError, match=r"example 10: side array 'probs' is \[n\] float16, .* \[n\] float32"):
        packed_batch([EncodedExample(seq, 10), EncodedExample(half, 10)], [((0, 0),), ((0, 5),)],
                     rows=1, length=10, pad_id=2)
    clash = replace(seq, side={"loss_mask": np.ones(5, np.float32)})
    with pytest.raises(ValueError, match=r"side arrays \['loss_mask'\] would overwrite batch keys"):
        padded_batch([EncodedExample(clash, 0)], length=10, pad_id=2)


def test_encoded_sequence_checks_side_shapes():
    ids = np.arange(5, dtype=np.int32)
    with pytest.raises(ValueError, match=r"side array 'probs' has shape \(4,\); it must be \[5\] or \[5, K\]"):
        EncodedSequence(ids, 2, False, side={"probs": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"side array 'topk' has shape \(5, 3, 1\)"):
        EncodedSequence(ids, 2, False, side={"topk": np.zeros((5, 3, 1), np.int32)})
    assert EncodedSequence(ids, 2, False).side == {}


def test_without_side_data_batches_are_unchanged():
    with_side = _pairs([(5, 7), (9, 4), (6, 6)])
    plain = _pairs([(5, 7), (9, 4), (6, 6)], side={})
    places, used = plan_pack([tuple(map(len, p.sequences)) for p in plain], slots=3, rows=4, length=16)
    for build in (lambda ps: padded_batch(ps + [None], length=12, pad_id=2),
                  lambda ps: packed_batch(ps, places, rows=used, length=16, pad_id=2)):
        batch, side_batch = build(plain), build(with_side)
        assert tuple(batch) == BATCH_KEYS
        for key in BATCH_KEYS:  # side arrays change nothing else, bit for bit
            assert batch[key].dtype == side_batch[key].dtype, key
            assert batch[key].tobytes() == side_batch[key].tobytes(), key
        assert tuple(pad_batch(batch, rows=8, length=20, pad_id=2)) == BATCH_KEYS
        assert tuple(stack_micro_batches([batch, batch])) == BATCH_KEYS
    assert tuple(padded_batch([None, None], length=4, pad_id=2)) == BATCH_KEYS  # all filler: no side keys
