"""Loader: deterministic order, exact resume from a saved position, disjoint covering shards."""

import json

import numpy as np
import pytest

from jaxalign.data import EncodedDataset, EncodedPair, EncodedSequence, Loader
from jaxalign.data.dataset import DataReport
from jaxalign.data.pipeline import build_loader, build_loaders_from_config

N = 23  # not a multiple of any batch size below: partial last batches


def _dataset(n=N, seed=0) -> EncodedDataset:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        p = int(rng.integers(2, 12))
        seqs = [EncodedSequence(rng.integers(3, 100, p + int(rng.integers(1, 30))).astype(np.int32), p, False)
                for _ in range(2)]
        seqs[1].ids[:p] = seqs[0].ids[:p]
        examples.append(EncodedPair(seqs[0], seqs[1], index=100 + i))
    return EncodedDataset(examples, DataReport())


def _loader(packing=False, shard=(0, 1), **kw) -> Loader:
    kw = {"batch_size": 4, "pad_id": 0, "seed": 7, "buckets": (16, 32, 64), **kw}
    if packing:
        kw.update(packing=True, pack_length=64, pack_rows=3)
    return Loader(_dataset(), shard_index=shard[0], shard_count=shard[1], **kw)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].shape == y[k].shape and (x[k] == y[k]).all(), k


def _indices(batches):
    return [int(i) for b in batches for i, m in zip(b["example_index"], b["pair_mask"]) if m]


@pytest.mark.parametrize("packing", [False, True])
def test_same_seed_same_order_and_every_epoch_covers_the_data(packing):
    a, b = _loader(packing), _loader(packing)
    per_epoch = a.batches_in_epoch(0)
    first, second = _take(a, per_epoch), _take(a, a.batches_in_epoch(1))
    _same(first + second, _take(b, len(first) + len(second)))
    for epoch in (first, second):
        assert sorted(_indices(epoch)) == list(range(100, 100 + N))  # each example exactly once
    assert _indices(first) != _indices(second)  # reshuffled every epoch
    other = _loader(packing, seed=8)
    assert _indices(_take(other, per_epoch)) != _indices(first)
    if not packing:
        assert per_epoch == 6 and first[-1]["pair_mask"].tolist() == [1, 1, 1, 0]  # 23 = 5 * 4 + 3
        assert {b["input_ids"].shape[1] for b in first} <= {16, 32, 64}  # bucketed lengths


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("stop", [2, 6, 9])  # mid-epoch, at the epoch boundary (6 padded batches), in epoch 2
def test_resume_yields_exactly_the_remaining_batches(packing, stop):
    reference = _take(_loader(packing), 14)
    first = _loader(packing)
    _same(_take(first, stop), reference[:stop])
    state = json.loads(json.dumps(first.get_state()))  # what the trainer stores in its checkpoint
    resumed = _loader(packing)
    resumed.set_state(state)
    _same(_take(resumed, 14 - stop), reference[stop:])


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_see_disjoint_shards_covering_the_data(packing):
    shards = [_loader(packing, shard=(q, 2)) for q in range(2)]
    n = shards[0].batches_in_epoch(0)
    assert shards[1].batches_in_epoch(0) == n  # lockstep: no process waits on another
    batches = [_take(s, n) for s in shards]
    seen = [_indices(b) for b in batches]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(100, 100 + N))
    for b0, b1 in zip(*batches):
        assert {k: v.shape for k, v in b0.items()} == {k: v.shape for k, v in b1.items()}  # one global shape
        assert b0["pair_mask"].shape == (2,)
        ids0, ids1 = set(np.unique(b0["sequence_ids"])) - {-1}, set(np.unique(b1["sequence_ids"])) - {-1}
        assert not ids0 & ids1 and ids0 | ids1 <= set(range(8))  # global sequence ids of a 4-pair batch
    if not packing:  # the shards' batches are exactly the single-process batches, split by slot
        single = _take(_loader(), n)
        for b0, b1, whole in zip(*batches, single):
            assert np.concatenate([b0["example_index"], b1["example_index"]]).tolist() == whole["example_index"][[0, 2, 1, 3]].tolist()


def test_epochs_eval_order_and_state_checks():
    loader = _loader(num_epochs=2)
    assert len(list(loader)) == 12
    with pytest.raises(StopIteration):
        next(loader)
    evaluation = _loader(shuffle=False, num_epochs=1)
    assert _indices(list(evaluation)) == list(range(100, 100 + N))
    state = _loader().get_state()
    with pytest.raises(ValueError, match="batch_size was 4, now 8"):
        _loader(batch_size=8).set_state(state)
    other_data = Loader(_dataset(seed=1), batch_size=4, pad_id=0, seed=7, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="fingerprint was"):
        other_data.set_state(state)
    with pytest.raises(ValueError, match="out of range"):
        _loader().set_state({**state, "batch": 99})
    with pytest.raises(ValueError, match="multiple of shard_count 3"):
        _loader(shard=(0, 3))
    assert Loader(_dataset(), batch_size=4, pad_id=0).shard_count == 1  # defaults: jax.process_index/count


def test_pipeline_on_the_fixture(bpe_tokenizer, hh_path):
    loader = build_loader(str(hh_path), bpe_tokenizer, batch_size=8, max_length=128, max_prompt_length=64,
                          on_bad_record="skip", shard_index=0, shard_count=1, packing=True, buckets=(128,))
    assert loader.report.num_records == 199 and len(loader.report.bad) == 1
    batch = next(loader)
    rows, length = batch["input_ids"].shape
    assert length == 128 and rows <= loader.pack_rows and batch["pair_mask"].sum() == 8


def test_loaders_from_the_trainer_config(bpe_tokenizer, hh_path):
    from jaxalign.train.config import base_config

    config = base_config()
    config.data.train = str(hh_path)
    config.data.on_bad_record = "skip"
    config.data.max_length, config.data.max_prompt_length = 128, 64
    config.data.buckets = (64, 128)
    config.data.eval_pairs = 16
    config.loss.name = "dove"
    loaders = build_loaders_from_config(config, bpe_tokenizer, shard_index=0, shard_count=1)
    train = _indices(_take(loaders.train, loaders.train.batches_in_epoch(0)))
    held = _indices(list(loaders.eval))
    assert len(held) == 16 and len(train) == 199 - 16 and not set(train) & set(held)
    assert loaders.train.mask == "prompt_and_completion"


def test_padded_state_resumes_with_another_process_count():
    """Global padded batches do not depend on the shard count: 2 processes -> 1 process resumes exactly."""
    two = [_loader(shard=(q, 2)) for q in range(2)]
    for s in two:
        _take(s, 4)
    states = [s.get_state() for s in two]
    assert states[0] == states[1]  # the same state on every process
    one = _loader()
    one.set_state(states[0])
    reference = _take(_loader(), 8)[4:]
    _same(_take(one, 4), reference)
    packed_state = _loader(True, shard=(0, 2)).get_state()
    with pytest.raises(ValueError, match="shard_count was 2, now 1"):
        _loader(True).set_state(packed_state)


def test_sft_loader(bpe_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loader = build_loader(str(path), bpe_tokenizer, batch_size=4, family="sft", max_length=32, max_prompt_length=16,
                          shard_index=0, shard_count=1, seed=3, buckets=(32,))
    batches = _take(loader, 2)
    assert batches[0]["input_ids"].shape == (4, 32)  # one row per example
    assert sorted(_indices(batches)) == list(range(5)) and batches[1]["pair_mask"].tolist() == [1, 0, 0, 0]
    assert set(np.unique(batches[0]["sequence_ids"]).tolist()) == {-1, 0, 1, 2, 3}
    with pytest.raises(ValueError, match="no usable examples"):
        build_loader(str(path), bpe_tokenizer, batch_size=4, max_length=32, max_prompt_length=16,
                     on_bad_record="skip", shard_index=0, shard_count=1)


@pytest.mark.parametrize("packing", [False, True])
def test_with_examples_keeps_the_settings_and_sizes_packed_rows_again(packing):
    kw = {"batch_size": 4, "pad_id": 0, "seed": 7, "buckets": (16, 32, 64), "row_multiple": 3}
    if packing:
        kw.update(packing=True, pack_length=64)
    loader = Loader(_dataset(), shard_index=1, shard_count=2, **kw)
    same = loader.with_examples(loader.examples)
    _same(_take(same, 3), _take(loader, 3))  # same settings, same examples: the same batches
    longer = loader.with_examples(_dataset(seed=3).examples, batch_size=8, shuffle=False)
    assert (longer.batch_size, longer.shuffle, longer.seed, longer.shard_index, longer.shard_count) == (8, False, 7, 1, 2)
    assert longer.buckets == (16, 32, 64) and longer.row_multiple == 3
    if packing:
        assert longer.pack_length == 64 and longer.pack_rows % 3 == 0
        assert longer.pack_rows == longer.default_pack_rows(3)  # sized for its own examples and batch


@pytest.mark.parametrize("shards", [1, 2])
def test_packed_batches_take_the_rows_they_need(shards):
    """A packed batch has the rows its pairs use on the shard that uses most, rounded up to
    ``row_multiple``; ``batch_shapes`` and ``batch_at`` tell what iteration yields."""
    multiple = shards  # two processes: say each splits its rows over 2 devices
    loaders = [Loader(_dataset(), batch_size=4, pad_id=0, seed=7, packing=True, pack_length=64, pack_rows=4,
                      row_multiple=multiple, shard_index=q, shard_count=shards) for q in range(shards)]
    seen_rows = set()
    for epoch in range(2):
        shapes = loaders[0].batch_shapes(epoch)
        assert all(lo.batch_shapes(epoch) == shapes for lo in loaders)
        per_shard = [_take(lo, len(shapes)) for lo in loaders]
        for k, batches in enumerate(zip(*per_shard)):
            rows = shapes[k][0]
            assert all(b["input_ids"].shape == (rows, 64) for b in batches)
            used = max(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches)
            assert rows == max(1, -(-used // multiple)) * multiple <= 4
            _same([loaders[0].batch_at(epoch, k)], [batches[0]])
            if k < len(shapes) - 1:  # 8 sequences of <= 41 tokens always fit 4 rows of 64: whole batches
                assert sum(b["pair_mask"].sum() for b in batches) == 4
            seen_rows.add(rows)
    assert len(seen_rows) > 1  # rows follow the batch instead of a fixed worst case


def test_batch_shapes_of_padded_batches_and_pack_rows_check():
    loader = _loader()
    assert loader.batch_shapes(1) == [b["input_ids"].shape for b in _take(loader, 12)[6:]]
    with pytest.raises(ValueError, match="pack_rows 3 must be a positive multiple of 2"):
        Loader(_dataset(), batch_size=4, pad_id=0, packing=True, pack_length=64, pack_rows=3, row_multiple=2,
               shard_index=0, shard_count=1)
