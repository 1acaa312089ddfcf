"""Shared fixtures of the online-driver tests: one tiny model, one prompt file, a config factory,
a recipe writer and the environment of ``python -m jaxalign.train`` subprocesses.

Everything is tiny (hidden 32, one layer, a 512-token BPE, rows of 64 tokens, 8 prompts per
round, K = 4, 10 new tokens) and the compiled programs are shared through one persistent
compilation cache (the in-process runs and the subprocesses alike).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.train.config import base_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
REWARDS = os.path.join(HERE, "reward_fns.py")
NUM_PROMPTS = 28  # rows of the prompt file; eval_prompts = 4 of them are held out
TINY = dict(family="llama", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=1,
            max_position=128)
SUBPROCESS_TIMEOUT = 240


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(persistent_compilation_cache):
    """Every module here uses the tests' persistent compilation cache (tests/conftest.py)."""


def reward(name: str) -> str:
    """``online.reward_function`` naming a function of ``reward_fns.py``."""
    return f"{REWARDS}:{name}"


@pytest.fixture(scope="session")
def records():
    """Preference rows (their prompts are the online prompts) with a metadata column ``tag``."""
    return [dict(r, tag=i) for i, r in enumerate(synthetic_records(NUM_PROMPTS, seed=3))]


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("models") / "tiny"
    corpus = [r["prompt"] + r[side] for r in records for side in ("chosen", "rejected")]
    write_tiny_checkpoint(path, seed=0, bpe_vocab_size=512, corpus=corpus, **TINY)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from jaxalign.tokenizers import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def set_keys(config, overrides: dict):
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def make_config(tiny_model_dir, prompt_file):
    """``make_config(**{"dotted.key": value})``: a 2-round online DPO run of the tiny model: 8
    prompts per round, K = 4, 10 new tokens, pairs in steps of 4 (2 steps a round), 4 held-out
    prompts, the ``by_ids`` reward."""

    def make(**overrides):
        c = base_config()
        c.seed = 0
        c.log_every = 1
        c.checkpoint_every = 0
        c.progress_bar = False
        c.huge_pages = False
        c.model.path = tiny_model_dir
        c.data.train = prompt_file
        c.data.max_length = 64
        c.data.max_prompt_length = 32
        c.data.buckets = (64,)
        c.data.batch_size = 4
        c.data.packing = False
        c.loss.name = "dpo"
        c.loss.beta = 0.1
        c.reference.mode = "precomputed"
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 0
        c.optimizer.schedule = "cosine"
        c.checkpoint.async_save = False
        c.checkpoint.export = True
        c.mesh.data = 1
        c.mesh.fsdp = 1
        c.mesh.tensor = 1
        c.online.rounds = 2
        c.online.prompts_per_round = 8
        c.online.samples_per_prompt = 4
        c.online.max_new_tokens = 10
        c.online.sample_batch_size = 8
        c.online.epochs = 1
        c.online.eval_prompts = 4
        c.online.reward_function = reward("by_ids")
        return set_keys(c, overrides)

    return make


def run_cli(recipe: str, workdir, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """``python -m jaxalign.train --config recipe --workdir workdir extra...`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "jaxalign.train", "--config", recipe, "--workdir", str(workdir), *extra],
        env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=ROOT,
    )


def export_params(workdir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(os.fspath(workdir), "export", "model.safetensors"))


def read_round(workdir, index: int, name: str) -> list[dict]:
    from jaxalign.online.rounds import RoundFiles

    return RoundFiles(os.fspath(workdir), index).read(name)


def round_summary(workdir, index: int) -> dict | None:
    from jaxalign.online.rounds import RoundFiles

    return RoundFiles(os.fspath(workdir), index).summary()


def checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(directory) else []


@pytest.fixture(scope="session")
def helpers(recipe_file, checkpoint_arrays):
    """The helpers above and tests/conftest.py's, for the test modules (which cannot import a
    conftest); ``checkpoint_arrays(workdir, step)`` reads a run directory's checkpoint."""
    import types

    return types.SimpleNamespace(
        reward=reward, write_recipe=recipe_file, run_cli=run_cli, export_params=export_params,
        read_round=read_round, round_summary=round_summary, checkpoint_steps=checkpoint_steps,
        checkpoint_arrays=lambda workdir, step: checkpoint_arrays(os.path.join(os.fspath(workdir), "checkpoints"), step),
        set_keys=set_keys, rewards_file=REWARDS, root=ROOT,
    )


# The run most tests look at (and the uninterrupted run the kill tests compare with): the
# default test config with a checkpoint after every step.
REFERENCE_RUN = {"checkpoint_every": 1}


@pytest.fixture(scope="session")
def reference_run(make_config, tmp_path_factory, _compile_cache_dir, compilation_cache_at):
    from jaxalign.online.driver import train

    # a session fixture is set up before the module's cache fixture: point JAX at the cache for this run too
    config = make_config(**REFERENCE_RUN)
    with compilation_cache_at(_compile_cache_dir):
        result = train(config, tmp_path_factory.mktemp("online") / "reference")
    assert result.status == "finished", result.message
    result.config = config
    return result
