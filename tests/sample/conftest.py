"""Fixtures of the sampler CLI tests: a tiny model, a model built to stop on cue, a short run.

All session-scoped and tiny (hidden 32, one layer, 128 positions) so that the decode programs
and the two training steps compile fast.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.tokenizers import load_tokenizer

TINY = dict(family="llama", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=1,
            max_position=128)
STOP_PROMPT = "I am curious about maps. Any thoughts?"  # the cue of the stopping model: its last token
FILLER = "a"  # what the stopping model repeats otherwise


@pytest.fixture(scope="session")
def records():
    return synthetic_records(24, seed=7)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("models") / "tiny"
    corpus = [r["prompt"] + r[side] for r in records for side in ("chosen", "rejected")]
    write_tiny_checkpoint(path, seed=0, corpus=corpus, **TINY)
    return str(path)


@pytest.fixture(scope="session")
def stopping_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model rewired so that its next token depends only on the current one: the
    layer adds nothing (o_proj and down_proj are 0), every embedding is ``-1`` except that of
    ``STOP_PROMPT``'s last token (``+1``), and the LM head scores EOS ``+sum(h)`` and
    ``FILLER`` ``-sum(h)``. So a prompt ending like ``STOP_PROMPT`` gets EOS at once (logit
    +32 against 0 and -32, whatever the temperature up to ~1), any other ``FILLER`` until
    ``max_new_tokens``."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path_factory.mktemp("models") / "stopping"
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tokenizer = load_tokenizer(path)
    cue = tokenizer(STOP_PROMPT, add_special_tokens=False)["input_ids"][-1]
    filler = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    assert len(filler) == 1
    weights = load_file(str(path / "model.safetensors"))
    embed = -np.ones_like(weights["model.embed_tokens.weight"])
    embed[cue] = 1.0
    head = np.zeros_like(weights["lm_head.weight"])
    head[tokenizer.eos_token_id], head[filler[0]] = 1.0, -1.0
    weights.update({"model.embed_tokens.weight": embed, "lm_head.weight": head})
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        weights[name] = np.zeros_like(weights[name])
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_model_dir, data_file):
    """A 2-step DPO run of the tiny model at a high learning rate: checkpoints at steps 1 and 2
    and an export."""
    from jaxalign.train.config import base_config
    from jaxalign.train.loop import train

    c = base_config()
    c.steps = 2
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 1
    c.progress_bar = False
    c.model.path = tiny_model_dir
    c.data.train = data_file
    c.data.eval_pairs = 0
    c.data.batch_size = 4
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.buckets = (64,)
    c.eval.at_start = False
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 0
    c.checkpoint.export = True
    c.checkpoint.async_save = False
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    workdir = str(tmp_path_factory.mktemp("runs") / "dpo")
    result = train(c, workdir)
    assert result.status == "finished" and result.export_dir, result
    return workdir


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """Prompts in every shape the sampler reads: text, messages, a preference pair, an SFT row."""
    rows = [
        {"prompt": "Tell me about maps."},
        {"prompt": [{"role": "user", "content": "Can you describe rivers for me?"}]},
        {"prompt": STOP_PROMPT, "chosen": " Sure.", "rejected": " No."},
        {"prompt": "Say something about bridges.", "completion": " Bridges span rivers."},
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(os.fspath(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
