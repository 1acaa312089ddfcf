"""The reference-cache pass: training layout (packed / padded), large batches, exact coverage.

The cache is built with ``reference.cache_batch_size`` pairs per batch (default 4x the
loader's batch) in the training layout; its sums must equal the in-step (frozen) reference
forward over the training loader's own batches, and cover every example exactly once.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

from jaxalign import models
from jaxalign.data.loader import Loader
from jaxalign.caches.reference import CoverageError, ReferenceCache, cache_loader, check_coverage
from jaxalign.scoring.forward import Forward, sequence_logps_fn
from jaxalign.train.run import RunError, prepare


@pytest.fixture(scope="module")
def reference_fn(reference_model_dir):
    """``loader -> {example_index: (chosen, rejected)}``: the frozen reference forward that the
    train step runs, over one epoch of the loader's own batches, on one device."""
    graphdef, params = nnx.split(models.from_pretrained(reference_model_dir), nnx.Param)
    fn = sequence_logps_fn(Forward(graphdef))

    def in_step(loader: Loader) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for _ in range(loader.batches_in_epoch(0)):
            batch = next(loader)
            sums = np.asarray(fn(params, {k: v for k, v in batch.items() if k != "example_index"}))
            p = batch["pair_mask"].shape[0]
            for j, index in enumerate(batch["example_index"].tolist()):
                if index >= 0:
                    assert index not in out
                    out[index] = (float(sums[j]), float(sums[p + j]))
        return out

    return in_step


def _assert_cache_equals(cache: ReferenceCache, truth: dict[int, tuple[float, float]]) -> None:
    assert sorted(cache.indices.tolist()) == sorted(truth)
    expected = np.asarray([truth[i] for i in cache.indices.tolist()])
    assert np.abs(expected).min() > 1.0  # real log-prob sums, not zeros
    np.testing.assert_allclose(cache.chosen, expected[:, 0], rtol=1e-5, atol=0)
    np.testing.assert_allclose(cache.rejected, expected[:, 1], rtol=1e-5, atol=0)


def test_packed_cache_on_a_mesh_equals_in_step_reference(make_config, reference_model_dir, reference_fn, tmp_path,
                                                         capsys):
    """Packed rows, the default cache batch (4 x 4 pairs; rows a multiple of data*fsdp = 4), on a
    (data=2, fsdp=2) mesh: the same sums as the reference forward on the packed training batches.
    A cache file that lost an example is refused with an error naming the example."""
    cache_dir = str(tmp_path / "cache")
    config = make_config(**{
        "reference.mode": "precomputed", "reference.path": reference_model_dir, "reference.cache_dir": cache_dir,
        "data.packing": True, "mesh.data": 2, "mesh.fsdp": 2, "progress_bar": True,
    })
    run = prepare(config, str(tmp_path / "w"))
    assert "reference cache (train)" in capsys.readouterr().err  # the progress bar
    assert run.train_loader.packing
    _assert_cache_equals(run.reference_caches["train"], reference_fn(run.train_loader))
    _assert_cache_equals(run.reference_caches["eval"], reference_fn(run.eval_loader))

    # Drop one example from the stored train cache: loading it is an error, not a silent 0.
    train_cache = run.reference_caches["train"]
    path = next(
        os.path.join(cache_dir, f) for f in os.listdir(cache_dir)
        if len(ReferenceCache.load(os.path.join(cache_dir, f)).indices) == len(train_cache.indices)
    )
    ReferenceCache(train_cache.indices[1:], train_cache.chosen[1:], train_cache.rejected[1:]).save(path)
    with pytest.raises(RunError, match=rf"train examples.*missing \(example_index \[{train_cache.indices[0]}\]\)"):
        prepare(config, str(tmp_path / "w2"))


def test_padded_cache_with_a_set_batch_equals_in_step_reference(make_config, reference_model_dir, reference_fn,
                                                                 tmp_path):
    """Padded rows (examples sorted by length into buckets), ``reference.cache_batch_size`` = 12
    (not a multiple of the train batch; the last batch has filler slots)."""
    config = make_config(**{
        "reference.mode": "precomputed", "reference.path": reference_model_dir, "data.eval_pairs": 0,
        "data.buckets": (32, 64), "reference.cache_batch_size": 12,
    })
    run = prepare(config, str(tmp_path / "w"))
    _assert_cache_equals(run.reference_caches["train"], reference_fn(run.train_loader))


def test_cache_batch_must_split_over_the_mesh(make_config, reference_model_dir, tmp_path):
    config = make_config(**{
        "reference.mode": "precomputed", "reference.path": reference_model_dir, "mesh.data": 2, "mesh.fsdp": 2,
        "reference.cache_batch_size": 6,
    })
    with pytest.raises(RunError, match=r"reference.cache_batch_size = 6 must be a multiple of 4"):
        prepare(config, str(tmp_path / "w"))


@pytest.mark.parametrize("packing", [True, False])
def test_cache_pass_covers_every_example_once_over_shards(make_config, tiny_model_dir, packing):
    """Two data shards (processes): the union of their cache batches holds every example once."""
    from jaxalign.data.pipeline import build_loaders_from_config
    from jaxalign.tokenizers import load_tokenizer

    config = make_config(**{"data.packing": packing, "data.eval_pairs": 0})
    tokenizer = load_tokenizer(tiny_model_dir)
    seen: list[int] = []
    counts = set()
    for shard in range(2):
        train = build_loaders_from_config(config, tokenizer, shard_index=shard, shard_count=2, row_multiple=2).train
        passes = cache_loader(train, 16)
        counts.add(passes.batches_in_epoch(0))
        for batch in passes:
            assert batch["pair_mask"].shape == (8,)
            if packing:
                assert batch["input_ids"].shape[0] % 2 == 0 and batch["input_ids"].shape[1] == train.pack_length
            seen += [i for i in batch["example_index"].tolist() if i >= 0]
    assert len(counts) == 1  # every shard runs the same number of batches (collectives stay in step)
    indices = [e.index for e in train.examples]
    assert sorted(seen) == sorted(indices)
    check_coverage(ReferenceCache(np.asarray(seen), np.zeros(len(seen)), np.zeros(len(seen))), np.asarray(indices), "x")


def test_check_coverage_names_missing_repeated_and_unknown_examples():
    cache = ReferenceCache(np.array([0, 1, 1, 7]), np.zeros(4), np.zeros(4))
    with pytest.raises(CoverageError) as e:
        check_coverage(cache, np.array([0, 1, 2]), "in file.npz")
    message = str(e.value)
    assert "in file.npz" in message
    assert "1 example(s) missing (example_index [2])" in message
    assert "cached more than once (example_index [1])" in message
    assert "unknown example(s) (example_index [7])" in message
    check_coverage(ReferenceCache(np.array([2, 0, 1]), np.zeros(3), np.zeros(3)), np.array([0, 1, 2]), "ok")


def test_cache_loader_sorts_padded_examples_and_keeps_packed_order(make_config, tiny_model_dir):
    from jaxalign.data.pipeline import build_loaders_from_config
    from jaxalign.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    padded = build_loaders_from_config(make_config(**{"data.eval_pairs": 0}), tokenizer, shard_index=0,
                                       shard_count=1).train
    lengths = [max(len(s) for s in e.sequences) for e in cache_loader(padded, 16).examples]
    assert lengths == sorted(lengths) and lengths != [max(len(s) for s in e.sequences) for e in padded.examples]
    packed = build_loaders_from_config(make_config(**{"data.eval_pairs": 0, "data.packing": True}), tokenizer,
                                       shard_index=0, shard_count=1, row_multiple=3).train
    loader = cache_loader(packed, 16)
    assert loader.packing and loader.pack_length == packed.pack_length and loader.pack_rows % 3 == 0
    assert loader.pack_rows > packed.pack_rows  # rows for 16 pairs, not the train loader's 4
