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

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.train.config import base_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
REWARDS = os.path.join(HERE, "reward_fns.py")
NUM_PROMPTS = 28  # rows of the prompt file; eval_prompts = 4 of them are held out
TINY = dict(family="llama", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=1,
            max_position=128)
_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
SUBPROCESS_TIMEOUT = 240


def reward(name: str) -> str:
    """``online.reward_function`` naming a function of ``reward_fns.py``."""
    return f"{REWARDS}:{name}"


@pytest.fixture(scope="session")
def _compile_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax-compilation-cache"))


@pytest.fixture(autouse=True, scope="module")
def persistent_compilation_cache(_compile_cache_dir):
    """Every ``train()`` builds new jitted functions (JAX's in-memory cache misses): the on-disk
    cache makes the repeats cheap. Restored afterwards."""
    old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    jax.config.update("jax_compilation_cache_dir", _compile_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


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


def write_recipe(config, path) -> str:
    """A recipe file whose ``get_config()`` rebuilds ``config`` (for ``python -m jaxalign.train``)."""
    values = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            else:
                values[f"{prefix}{key}"] = value

    walk(config)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            "from jaxalign.train.config import base_config\n\n\n"
            f"VALUES = {values!r}\n\n\n"
            "def get_config():\n"
            "    c = base_config()\n"
            "    for key, value in VALUES.items():\n"
            "        *parents, leaf = key.split('.')\n"
            "        node = c\n"
            "        for p in parents:\n"
            "            node = node[p]\n"
            "        node[leaf] = value\n"
            "    return c\n"
        )
    return path


@pytest.fixture(scope="session")
def cli_env(_compile_cache_dir):
    """``python -m jaxalign.train`` subprocesses: this checkout, CPU, the tests' 8 fake devices,
    the shared compilation cache."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=_compile_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(key, None)
    return env


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


def checkpoint_arrays(workdir, step: int) -> dict[str, np.ndarray]:
    """The saved state of ``step`` as host arrays, read straight from the files."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.fspath(workdir), "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, restore_args=args)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


@pytest.fixture(scope="session")
def helpers():
    """The helpers above, for the test modules (which cannot import this conftest)."""
    import types

    return types.SimpleNamespace(
        reward=reward, write_recipe=write_recipe, run_cli=run_cli, export_params=export_params,
        read_round=read_round, round_summary=round_summary, checkpoint_steps=checkpoint_steps,
        checkpoint_arrays=checkpoint_arrays, set_keys=set_keys, rewards_file=REWARDS, root=ROOT,
    )


# The run most tests look at (and the uninterrupted run the kill tests compare with): the
# default test config with a checkpoint after every step.
REFERENCE_RUN = {"checkpoint_every": 1}


@pytest.fixture(scope="session")
def reference_run(make_config, tmp_path_factory, _compile_cache_dir):
    from jaxalign.online.driver import train

    # a session fixture is set up before the module's cache fixture: point JAX at the cache for this run too
    old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    jax.config.update("jax_compilation_cache_dir", _compile_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    config = make_config(**REFERENCE_RUN)
    try:
        result = train(config, tmp_path_factory.mktemp("online") / "reference")
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    assert result.status == "finished", result.message
    result.config = config
    return result
