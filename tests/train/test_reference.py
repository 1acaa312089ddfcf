"""Precomputed reference log-probs: same run as the frozen reference; cache keyed by its inputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.data.store import ArrayStore
from jaxalign.train.loop import train
from jaxalign.caches.reference import ReferenceCache
from jaxalign.train.run import prepare


def test_precomputed_reference_on_a_mesh_equals_frozen_reference(make_config, reference_model_dir, tmp_path,
                                                                 metrics_by_step):
    """Frozen reference on one device vs precomputed reference log-probs on a (data=2, fsdp=2,
    tensor=2) mesh of the 8 fake CPU devices: same metrics and parameters. SGD, so that the
    parameters differ by lr times the gradient difference (Adam's normalisation would amplify
    float32 reduction-order noise in near-zero gradient components)."""
    overrides = {
        "steps": 3, "eval_every": 3, "data.batch_size": 8, "data.micro_batch_size": 4,
        "reference.path": reference_model_dir, "checkpoint.export": True,
        "optimizer.name": "sgd", "optimizer.learning_rate": 0.5,
    }
    frozen = train(make_config(**overrides, **{"reference.mode": "frozen"}), tmp_path / "frozen")
    pre = train(
        make_config(**overrides, **{"reference.mode": "precomputed", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
        tmp_path / "pre",
    )
    cache_files = os.listdir(tmp_path / "pre" / "reference_cache")
    assert len(cache_files) == 2  # train and eval examples

    a, b = metrics_by_step(tmp_path / "frozen"), metrics_by_step(tmp_path / "pre")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert abs(a[1]["rewards/margins"]) > 1e-3  # a reference that differs from the policy
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, abs=2e-5), (step, key)
    pa = load_file(os.path.join(frozen.export_dir, "model.safetensors"))
    pb = load_file(os.path.join(pre.export_dir, "model.safetensors"))
    initial = load_file(os.path.join(make_config().model.path, "model.safetensors"))
    assert max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa) <= 1e-5
    assert max(float(np.max(np.abs(pa[k] - initial[k]))) for k in pa) > 1e-3  # the steps moved the weights


def test_cache_is_recomputed_when_an_input_changes(make_config, reference_model_dir, tiny_model_dir, tmp_path):
    cache_dir = str(tmp_path / "cache")
    base = {"reference.mode": "precomputed", "reference.path": reference_model_dir, "reference.cache_dir": cache_dir,
            "data.eval_pairs": 0}

    def cache_files():
        return set(os.listdir(cache_dir))

    first = prepare(make_config(**base), str(tmp_path / "w1"))
    files = cache_files()
    assert len(files) == 1
    # Same inputs: the cache is reused, not recomputed.
    stamp = {f: os.path.getmtime(os.path.join(cache_dir, f)) for f in files}
    prepare(make_config(**base), str(tmp_path / "w2"))
    assert cache_files() == files and all(os.path.getmtime(os.path.join(cache_dir, f)) == t for f, t in stamp.items())

    # Truncation settings change the key.
    prepare(make_config(**base, **{"data.max_prompt_length": 16}), str(tmp_path / "w3"))
    after_truncation = cache_files()
    assert len(after_truncation) == 2

    # Reference weights change the key (the policy is now its own reference).
    prepare(make_config(**{**base, "reference.path": ""}), str(tmp_path / "w4"))
    after_weights = cache_files()
    assert len(after_weights) == 3

    # The tokenizer changes the key even when the tokens do not (here only the chat template differs).
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, tok_dir)
    template = tok_dir / "chat_template.jinja"
    template.write_text(template.read_text() + "{# edited #}")
    prepare(make_config(**base, **{"model.tokenizer": str(tok_dir)}), str(tmp_path / "w5"))
    assert len(cache_files()) == 4

    # The cache holds every training example once, keyed by example_index.
    cache = first.reference_caches["train"]
    assert sorted(cache.indices.tolist()) == sorted(e.index for e in first.train_loader.examples)
    looked_up = cache.lookup(np.array([cache.indices[0], -1]))
    assert looked_up["ref_chosen_logps"][0] == cache.chosen[0] and looked_up["ref_chosen_logps"][1] == 0
    with pytest.raises(KeyError, match="example_index"):
        cache.lookup(np.array([10_000]))
    assert isinstance(ReferenceCache.load(os.path.join(cache_dir, sorted(files)[0])), ReferenceCache)


def test_vpo_reference_samples_frozen_equals_precomputed(make_config, reference_model_dir, tmp_path, metrics_by_step):
    cache_dir = str(tmp_path / "cache")
    overrides = {
        "steps": 1, "data.eval_pairs": 0, "loss.name": "vpo", "loss.vpo_calibration": "reference_samples",
        "loss.vpo_alpha": 1.0, "loss.vpo_max_new_tokens": 8, "reference.path": reference_model_dir,
        "reference.cache_dir": cache_dir, "optimizer.learning_rate": 1e-2,
    }
    frozen = train(make_config(**overrides, **{"reference.mode": "frozen"}), tmp_path / "frozen")
    samples = sorted(f for f in os.listdir(cache_dir) if f.startswith("calibration-"))
    assert len(samples) == 1  # one sample per training prompt
    pre = train(make_config(**overrides, **{"reference.mode": "precomputed"}), tmp_path / "pre")
    assert sorted(f for f in os.listdir(cache_dir) if f.startswith("calibration-")) == samples  # reused
    lengths = np.diff(ArrayStore(os.path.join(cache_dir, samples[0])).read()["offsets"])
    assert lengths.min() >= 1 and lengths.max() <= 8
    a, b = metrics_by_step(tmp_path / "frozen"), metrics_by_step(tmp_path / "pre")
    assert abs(a[1]["vpo/regularizer"]) > 0  # the calibration term is live
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, abs=2e-5), (step, key)
    assert frozen.step == pre.step == 1
