"""Shared fixtures of the trainer tests: one tiny model, one synthetic data file, a config factory.

Everything is built once per session and kept tiny (hidden 32, two layers, rows of 64 tokens,
a mesh of one device) so that the compiled steps are cheap.
"""

from __future__ import annotations

import json

import pytest

from jaxalign.train.config import base_config
from jaxalign.train.metrics import HARDWARE_METRICS, read_metrics
from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint

NUM_RECORDS = 48


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(persistent_compilation_cache):
    """Every module here uses the tests' persistent compilation cache (tests/conftest.py)."""

# The tiny model of these tests: hidden 32, one layer, GQA, a BPE trained on the synthetic task.
TINY = dict(family="llama", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=1,
            max_position=128)


def corpus(records):
    return [r["prompt"] + r[side] for r in records for side in ("chosen", "rejected")]


@pytest.fixture(scope="session")
def records():
    return synthetic_records(NUM_RECORDS, seed=7)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("models") / "tiny"
    write_tiny_checkpoint(path, seed=0, corpus=corpus(records), **TINY)
    return str(path)


@pytest.fixture(scope="session")
def reference_model_dir(tmp_path_factory, records):
    """A second tiny model (same tokenizer and shapes, other weights): a reference that differs
    from the policy, so that rewards and margins are not all 0."""
    path = tmp_path_factory.mktemp("models") / "reference"
    write_tiny_checkpoint(path, seed=5, corpus=corpus(records), **TINY)
    return str(path)


@pytest.fixture(scope="session")
def make_config(tiny_model_dir, data_file):
    """``make_config(**overrides)``: a tiny, fast, validated-by-the-run config (dotted keys)."""

    def make(**overrides):
        c = base_config()
        c.steps = 2
        c.log_every = 1
        c.eval_every = 0
        c.checkpoint_every = 0
        c.progress_bar = False
        c.model.path = tiny_model_dir
        c.data.train = data_file
        c.data.eval_pairs = 8
        c.data.batch_size = 4
        c.data.max_length = 64
        c.data.max_prompt_length = 32
        c.data.buckets = (64,)
        c.eval.batch_size = 8
        c.eval.at_start = False
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 0
        c.checkpoint.export = False
        c.checkpoint.async_save = False
        c.mesh.data = 1
        c.mesh.fsdp = 1
        c.mesh.tensor = 1
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return c

    return make


def _metrics_by_step(workdir: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for entry in read_metrics(workdir):
        out.setdefault(entry["step"], {}).update({k: v for k, v in entry.items() if k not in HARDWARE_METRICS})
    return out


@pytest.fixture(scope="session")
def metrics_by_step():
    """``metrics_by_step(workdir) -> {step: entry}``: train and eval entries of a step merged,
    without the timings and layout figures (``HARDWARE_METRICS``), so that two runs of the same
    training compare equal."""
    return _metrics_by_step
