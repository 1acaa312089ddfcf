"""Teacher caches: the cached top-k and advantages equal an on-the-fly computation on the training
batches (padded and packed: the side arrays survive batching), a second call reads the disk, a
changed teacher gets another directory, the two ADPA teachers are never held together."""

import gc
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.caches.fingerprint import params_digest
from jaxalign.caches.teacher import (
    StoredSide,
    advantage_cache_path,
    advantage_loader,
    check_vocabulary,
    teacher_topk_loader,
    topk_cache_path,
)
from jaxalign.data import EncodedPair, EncodedSequence
from jaxalign.data.dataset import DataReport, EncodedDataset
from jaxalign.data.loader import Loader
from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.objectives import STEP_KEYS
from jaxalign.scoring.forward import Forward
from jaxalign.scoring.topk import candidate_logps, candidate_logps_fn, teacher_topk, teacher_topk_fn

VOCAB, K = 320, 5


def _model(seed: int):
    """A tiny Llama with O(0.3) perturbed weights (peaked distributions); ``(graphdef, params)``."""
    model = make_model(tiny_config("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                   intermediate_size=64, max_position=64), seed=seed)
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    return graphdef, jax.tree.unflatten(treedef, [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
                                                  for x in leaves])


@pytest.fixture(scope="module")
def teachers():
    return {"dpo": _model(0), "reference": _model(2)}


def _loader(packing: bool, **changes) -> Loader:
    rng = np.random.default_rng(0)
    seq = lambda n, p: EncodedSequence(rng.integers(1, VOCAB, n).astype(np.int32), p, False)
    pairs = [EncodedPair(seq(int(rng.integers(6, 20)), 4), seq(int(rng.integers(6, 20)), 4), 100 + i)
             for i in range(10)]
    settings = dict(batch_size=4, pad_id=0, seed=1, shuffle=True, buckets=(16, 32), packing=packing,
                    pack_length=32 if packing else None, shard_index=0, shard_count=1)
    return Loader(EncodedDataset(pairs, DataReport()), **{**settings, **changes})


def _device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "example_index"}


def _step_keys(batch):
    return {k: jnp.asarray(batch[k]) for k in STEP_KEYS}


class Teacher:
    """A factory of a teacher's jitted top-k pass that counts its calls and batches."""

    def __init__(self, model, k=K):
        self.model, self.k, self.calls, self.batches = model, k, 0, 0

    def __call__(self):
        self.calls += 1
        graphdef, params = self.model
        fn = teacher_topk_fn(Forward(graphdef, chunk=4), self.k)

        def run(batch):
            self.batches += 1
            return fn(params, _step_keys(batch))

        return run


def _epoch(loader):
    return [loader.batch_at(0, b) for b in range(loader.batches_in_epoch(0))]


@pytest.mark.parametrize("packing", [False, True])
def test_cached_topk_equals_on_the_fly_on_training_batches(teachers, tmp_path, packing):
    loader = _loader(packing)
    teacher = Teacher(teachers["dpo"])
    digests = {"teacher": params_digest(teachers["dpo"][1])}
    attached = teacher_topk_loader(loader, teacher, cache_dir=str(tmp_path), digests=digests, k=K, batch_size=8,
                                   write=True)
    assert teacher.calls == 1 and os.path.isdir(topk_cache_path(loader, cache_dir=str(tmp_path), digests=digests, k=K))
    graphdef, params = teachers["dpo"]
    for batch in _epoch(attached):
        assert batch["teacher_topk_ids"].dtype == np.int32 and batch["teacher_topk_probs"].dtype == np.float32
        ids, probs = teacher_topk(Forward(graphdef), params, _device(batch), K)
        scored = batch["loss_mask"] > 0
        assert scored.sum() > 0
        np.testing.assert_array_equal(batch["teacher_topk_ids"], np.asarray(ids))  # 0 off the scored tokens too
        np.testing.assert_allclose(batch["teacher_topk_probs"], np.asarray(probs), rtol=2e-3, atol=1e-5)  # float16

    # A second call reads the disk: no teacher pass; the attached arrays are the same.
    again = Teacher(teachers["dpo"])
    reread = teacher_topk_loader(loader, again, cache_dir=str(tmp_path), digests=digests, k=K, batch_size=8,
                                 write=True)
    assert again.calls == 0
    side = reread.examples[0].chosen.side["teacher_topk_probs"]
    assert isinstance(side, StoredSide) and isinstance(side.rows, np.memmap)
    for a, b in zip(_epoch(attached), _epoch(reread)):
        for key in ("teacher_topk_ids", "teacher_topk_probs"):
            np.testing.assert_array_equal(a[key], b[key])


def test_changed_teacher_k_or_data_is_another_cache_and_nothing_is_overwritten(teachers, tmp_path):
    loader = _loader(False)
    common = dict(cache_dir=str(tmp_path), k=K, batch_size=8, write=True)
    first = {"teacher": params_digest(teachers["dpo"][1])}
    teacher_topk_loader(loader, Teacher(teachers["dpo"]), digests=first, **common)
    path = topk_cache_path(loader, cache_dir=str(tmp_path), digests=first, k=K)
    stamp = {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}

    other = Teacher(teachers["reference"])
    second = {"teacher": params_digest(teachers["reference"][1])}
    assert second != first
    teacher_topk_loader(loader, other, digests=second, **common)
    assert other.calls == 1
    assert topk_cache_path(loader, cache_dir=str(tmp_path), digests=second, k=K) != path
    assert topk_cache_path(loader, cache_dir=str(tmp_path), digests=first, k=K + 1) != path
    assert topk_cache_path(_loader(False, mask="prompt_and_completion"), cache_dir=str(tmp_path), digests=first,
                           k=K) != path
    assert len([d for d in os.listdir(tmp_path) if d.startswith("teacher-topk-")]) == 2
    assert stamp == {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}

    # A directory that holds another data set's cache under this key is an error, left as it is.
    fewer = Loader(EncodedDataset(loader.examples[:6], DataReport()), batch_size=4, pad_id=0, shuffle=False,
                   buckets=(16, 32), shard_index=0, shard_count=1)
    clash = topk_cache_path(fewer, cache_dir=str(tmp_path), digests=first, k=K)
    os.rename(path, clash)
    with pytest.raises(ValueError, match=r"delete the directory to recompute it\) does not hold the 6 examples"):
        teacher_topk_loader(fewer, Teacher(teachers["dpo"]), digests=first, **common)
    assert stamp == {f: os.path.getmtime(os.path.join(clash, f)) for f in os.listdir(clash)}


def test_advantages_equal_on_the_fly_and_the_teachers_are_never_held_together(teachers, tmp_path):
    loader = _loader(True)
    held = []

    def dpo_teacher():
        graphdef, params = teachers["dpo"]
        fn = teacher_topk_fn(Forward(graphdef), K)
        run = lambda batch: fn(params, _step_keys(batch))
        held.append(weakref.ref(run))
        return run

    def reference():
        gc.collect()
        assert held and held[0]() is None, "the DPO teacher's pass is still held when the reference is loaded"
        graphdef, params = teachers["reference"]
        fn = candidate_logps_fn(Forward(graphdef, chunk=4), "candidate_ids")
        return lambda batch: fn(params, {**_step_keys(batch), "candidate_ids": jnp.asarray(batch["candidate_ids"])})

    digests = {"dpo": params_digest(teachers["dpo"][1]), "reference": params_digest(teachers["reference"][1])}
    common = dict(cache_dir=str(tmp_path), digests=digests, k=K, batch_size=8, write=True)
    attached = advantage_loader(loader, dpo_teacher, reference, **common)
    assert len(held) == 1
    (dpo_graph, dpo_params), (ref_graph, ref_params) = teachers["dpo"], teachers["reference"]
    for batch in _epoch(attached):
        p = batch["pair_mask"].shape[0]
        device = _device(batch)
        ids, probs = teacher_topk(Forward(dpo_graph), dpo_params, device, K)
        advantages = jnp.log(probs) - candidate_logps(Forward(ref_graph), ref_params, device, ids)
        state = (batch["loss_mask"] > 0) & (batch["sequence_ids"] >= p)
        assert state.sum() > 0 and (batch["loss_mask"][batch["sequence_ids"] < p] > 0).any()
        np.testing.assert_array_equal(batch["candidate_ids"], np.where(state[..., None], np.asarray(ids), 0))
        np.testing.assert_allclose(batch["advantages"], np.where(state[..., None], np.asarray(advantages), 0.0),
                                   rtol=1e-4, atol=2e-5)
        assert batch["advantages"].dtype == np.float32 and np.abs(batch["advantages"][state]).max() > 0.1

    never = lambda: pytest.fail("a cached advantage pass loaded a teacher")
    reread = advantage_loader(loader, never, never, **common)
    for a, b in zip(_epoch(attached), _epoch(reread)):
        np.testing.assert_array_equal(a["advantages"], b["advantages"])
    assert os.path.isdir(advantage_cache_path(loader, cache_dir=str(tmp_path), digests=digests, k=K))


def test_vocabulary_mismatch_names_both_models():
    same = dict(teacher="t", student="s", teacher_vocab_size=320, student_vocab_size=320, teacher_tokenizer="ab" * 32,
                student_tokenizer="ab" * 32)
    check_vocabulary(**same)
    with pytest.raises(ValueError, match=r"teacher /m/big and student /m/small do not share a vocabulary "
                                         r"\(vocab_size 512 vs 320; tokenizer digest cdcd"):
        check_vocabulary(**{**same, "teacher": "/m/big", "student": "/m/small", "teacher_vocab_size": 512,
                            "teacher_tokenizer": "cd" * 32})
