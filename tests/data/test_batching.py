"""Batches follow the contract of docs/architecture.md; packing gives the same log-probs as padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.data import BATCH_KEYS, Encoder, bucket_length, loss_mask, pad_batch, packed_batch, padded_batch, plan_pack
from jaxalign.data.dataset import encode_records, read_records
from jaxalign.models import ModelConfig, make_model

DTYPES = {
    "input_ids": np.int32, "positions": np.int32, "segment_ids": np.int32, "loss_mask": np.float32,
    "sequence_ids": np.int32, "pair_mask": np.float32, "example_index": np.int64,
}


@pytest.fixture(scope="module")
def hh_pairs(bpe_tokenizer, hh_path):
    records, _ = read_records(str(hh_path), on_bad_record="skip")
    examples, _ = encode_records(records[:8], Encoder(bpe_tokenizer), max_length=48, max_prompt_length=24)
    return examples


def _check_types(batch, rows, length, slots):
    assert tuple(batch) == BATCH_KEYS
    for key, value in batch.items():
        assert value.dtype == DTYPES[key], key
    for key in BATCH_KEYS[:5]:
        assert batch[key].shape == (rows, length), key
    assert batch["pair_mask"].shape == batch["example_index"].shape == (slots,)


def _locate(batch, seq_id):
    """(row, start, end) of the contiguous tokens of one sequence."""
    rows, cols = np.nonzero(batch["sequence_ids"] == seq_id)
    assert len(set(rows.tolist())) == 1, "a sequence must stay in one row"
    assert (np.diff(cols) == 1).all(), "a sequence must be contiguous"
    return rows[0], cols[0], cols[-1] + 1


def _check_sequences(batch, slots, mask_mode, offset=0, total=None):
    total = total or len(slots)
    for p, slot in enumerate(slots):
        if slot is None:
            assert batch["pair_mask"][p] == 0 and batch["example_index"][p] == -1
            assert not np.isin(batch["sequence_ids"], [offset + p, offset + p + total]).any()
            continue
        assert batch["pair_mask"][p] == 1 and batch["example_index"][p] == slot.index
        for s, seq in enumerate(slot.sequences):
            row, start, end = _locate(batch, offset + p + s * total)
            assert (batch["input_ids"][row, start:end] == seq.ids).all()
            assert (batch["positions"][row, start:end] == np.arange(len(seq))).all()
            seg = batch["segment_ids"][row, start:end]
            assert (seg == seg[0]).all() and seg[0] > 0
            assert (batch["segment_ids"][row] == seg[0]).sum() == len(seq)  # segment id unique within the row
            assert (batch["loss_mask"][row, start:end] == loss_mask(seq, mask_mode)).all()
    pad = batch["sequence_ids"] < 0
    assert (batch["segment_ids"][pad] == 0).all() and (batch["loss_mask"][pad] == 0).all()
    assert (batch["positions"][pad] == 0).all()


def test_padded_layout(hh_pairs):
    slots = hh_pairs[:3] + [None]
    batch = padded_batch(slots, length=64, pad_id=2)
    _check_types(batch, 8, 64, 4)
    _check_sequences(batch, slots, "completion")
    # TRL's layout: row p is chosen p, row P + p is rejected p, each starting at column 0.
    for p in range(3):
        assert _locate(batch, p)[:2] == (p, 0) and _locate(batch, 4 + p)[:2] == (4 + p, 0)
    assert (batch["input_ids"][3] == 2).all() and (batch["input_ids"][7] == 2).all()  # filler rows
    # One process's share of a global batch of 8 slots: global slot numbers.
    share = padded_batch(slots, length=64, pad_id=2, slot_offset=4, total_slots=8)
    _check_sequences(share, slots, "completion", offset=4, total=8)
    assert set(np.unique(share["sequence_ids"]).tolist()) == {-1, 4, 5, 6, 12, 13, 14}


def test_packed_layout(hh_pairs):
    lengths = [tuple(len(s) for s in e.sequences) for e in hh_pairs]
    places, used = plan_pack(lengths, slots=6, rows=5, length=128)
    taken = len(places)
    assert 0 < taken <= 6 and 0 < used <= 5
    slots = hh_pairs[:taken] + [None] * (6 - taken)
    batch = packed_batch(slots, places + [None] * (6 - taken), rows=used, length=128, pad_id=2,
                         mask="prompt_and_completion")
    _check_types(batch, used, 128, 6)
    _check_sequences(batch, slots, "prompt_and_completion")
    assert max(len(set(r[r > 0].tolist())) for r in batch["segment_ids"]) >= 2  # rows do hold several sequences
    assert (batch["segment_ids"] > 0).any(axis=1).all()  # the rows used are the first ones: none is empty


def test_plan_pack_is_first_fit_decreasing():
    # In item order, first fit needs 4 rows of 10 ([2, 5, 1], [4, 3], [7], [8]); longest first
    # it fills 3 exactly: [8, 2], [7, 3], [5, 4, 1].
    places, used = plan_pack([(2, 5), (4, 7), (1, 3), (8,)], slots=4, rows=4, length=10)
    assert used == 3
    assert places == [((0, 8), (2, 0)), ((2, 5), (1, 0)), ((2, 9), (1, 7)), ((0, 0),)]


def test_plan_pack_takes_the_longest_leading_run_that_fits():
    assert plan_pack([(8,), (8,), (3,)], slots=3, rows=2, length=10) == ([((0, 0),), ((1, 0),)], 2)
    # 18 tokens would fit 2 rows of 10 by count, but no placement does: two items are taken
    assert plan_pack([(6,), (6,), (6,)], slots=3, rows=2, length=10) == ([((0, 0),), ((1, 0),)], 2)
    assert plan_pack([(3,), (3,), (3,)], slots=2, rows=2, length=10) == ([((0, 0),), ((0, 3),)], 1)  # at most `slots`


def test_pad_batch_adds_empty_rows_and_columns(hh_pairs):
    batch = padded_batch(hh_pairs[:2], length=128, pad_id=2)
    wider = pad_batch(batch, rows=6, length=160, pad_id=2)
    _check_types(wider, 6, 160, 2)
    _check_sequences(wider, hh_pairs[:2], "completion")
    assert (wider["input_ids"][4:] == 2).all() and (wider["input_ids"][:, 128:] == 2).all()
    assert pad_batch(batch, rows=4, length=128, pad_id=2) is batch
    with pytest.raises(ValueError, match=r"cannot pad a \[4, 128\] batch to \[2, 128\]"):
        pad_batch(batch, rows=2, length=128, pad_id=2)


def test_sft_slots_and_buckets(hh_pairs):
    from jaxalign.data.encoding import EncodedExample

    singles = [EncodedExample(p.chosen, p.index) for p in hh_pairs[:2]]
    batch = padded_batch(singles + [None], length=64, pad_id=2)
    _check_types(batch, 3, 64, 3)
    _check_sequences(batch, singles + [None], "completion")
    with pytest.raises(ValueError, match="mixes preference pairs and single"):
        padded_batch([hh_pairs[0], singles[0]], length=64, pad_id=2)
    assert [bucket_length(n, (64, 128, 32)) for n in (1, 32, 33, 128)] == [32, 32, 64, 128]
    with pytest.raises(ValueError, match="exceeds the largest bucket 128"):
        bucket_length(129, (64, 128))
    with pytest.raises(ValueError, match=r"does not fit 1 rows of 8 tokens"):
        plan_pack([(6, 6)], slots=1, rows=1, length=8)


def test_packing_gives_the_same_logps_as_padding(hh_pairs, bpe_tokenizer):
    """Per-sequence log-prob sums from jaxalign.models' Llama decoder, padded vs packed rows."""
    config = ModelConfig(family="llama", vocab_size=len(bpe_tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_position=256)
    model = make_model(config, seed=0)

    @jax.jit
    def per_token(input_ids, positions, segment_ids):
        logits = model(input_ids, positions=positions, segment_ids=segment_ids)
        return losses.token_logps(logits, input_ids, segment_ids=segment_ids)

    P = len(hh_pairs)
    lengths = [tuple(len(s) for s in e.sequences) for e in hh_pairs]
    places, _ = plan_pack(lengths, slots=P, rows=P, length=128)
    assert len(places) == P
    sums = {}
    for layout in ("padded", "packed"):
        for mode in ("completion", "prompt_and_completion"):
            if layout == "padded":
                batch = padded_batch(hh_pairs, length=64, pad_id=2, mask=mode)
            else:
                batch = packed_batch(hh_pairs, places, rows=P, length=128, pad_id=2, mask=mode)
                assert max(len(set(r[r > 0].tolist())) for r in batch["segment_ids"]) >= 2
            tok = per_token(*(jnp.asarray(batch[k]) for k in ("input_ids", "positions", "segment_ids")))
            total, count = losses.segment_logps(tok, jnp.asarray(batch["loss_mask"]), jnp.asarray(batch["sequence_ids"]),
                                                num_sequences=2 * P)
            sums[layout, mode] = (np.asarray(total), np.asarray(count))
    for mode in ("completion", "prompt_and_completion"):
        (pad, pad_n), (pack, pack_n) = sums["padded", mode], sums["packed", mode]
        assert (pad_n == pack_n).all() and (pad_n >= 1).all()
        np.testing.assert_allclose(pack, pad, rtol=1e-5, atol=1e-4)
        assert np.abs(pad).min() > 1.0  # real, non-trivial log-probs
    # DOVE's mask adds the prompt tokens to the sums.
    assert (sums["padded", "prompt_and_completion"][1] > sums["padded", "completion"][1]).all()
