"""The online quickstart's first two stages, on the synthetic task (``online.bootstrap = synthetic``).

Before the rounds, two offline runs (``jaxalign.train.loop.train``, each resumable in its own
directory) make what an online run starts from:

1. **SFT** (``WORKDIR/bootstrap/sft``): the tiny model learns to answer the synthetic task's
   prompts with completions of mixed quality (each prompt with its friendly *and* its
   dismissive answer), so that its samples hold both kinds;
2. **reward model** (``WORKDIR/bootstrap/reward_model``): Bradley-Terry on the task's
   preference pairs (friendly over dismissive), from the same tiny model.

The online run then starts from the SFT export (policy and initial reference) and scores with
the reward model's export; the rounds' ``data.train`` is the task's records (their prompts).
"""

from __future__ import annotations

import os

import ml_collections

from jaxalign import parallel
from jaxalign.data.jsonl import read_jsonl, write_jsonl
from jaxalign.train import build
from jaxalign.train.config import base_config
from jaxalign.train.loop import train

__all__ = ["bootstrap"]


def _stage(config: ml_collections.ConfigDict, loss: str, steps: int, data: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.online = base_config().online.to_dict()  # an offline run: no online key (a resumed stage ignores them)
    c.loss.name = loss
    c.reference.mode = "none"
    c.steps = steps
    c.data.train = data
    c.data.eval = ""  # held out: data.eval_pairs of the stage's records
    c.eval_every = steps
    c.checkpoint_every = steps
    c.checkpoint.keep_best = ""
    c.optimizer.learning_rate = config.online.bootstrap_learning_rate
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.optimizer.schedule = "cosine"
    c.lock()
    return c


def _finished(result, stage: str) -> str:
    if result.status != "finished" or result.export_dir is None:
        raise build.RunError(f"bootstrap stage {stage} did not finish ({result.status}): {result.message}",
                             exit_code=1)
    return result.export_dir


def bootstrap(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Runs the stages (or finds them done) and returns the online run's config: ``model.path``
    = the SFT export, ``online.reward_model`` = the reward model's export, ``data.train`` = the
    task's records."""
    is_main = parallel.is_main_process()
    resolved = build.resolve_inputs(config, workdir, is_main)  # the synthetic records and the tiny model
    pairs = resolved.data.train
    mixed = os.path.join(workdir, "data", "synthetic-sft-mixed.jsonl")
    if is_main and not os.path.exists(mixed):
        write_jsonl(mixed, [{"prompt": r["prompt"], "completion": r[side]}
                            for r in read_jsonl(pairs) for side in ("chosen", "rejected")])
    parallel.barrier("bootstrap-data")
    o = config.online
    root = os.path.join(workdir, "bootstrap")
    sft = _finished(train(_stage(resolved, "sft", o.bootstrap_sft_steps, mixed), os.path.join(root, "sft")), "sft")
    reward_model = _finished(
        train(_stage(resolved, "bradley_terry", o.bootstrap_reward_model_steps, pairs),
              os.path.join(root, "reward_model")), "reward_model")
    out = ml_collections.ConfigDict(config.to_dict())
    out.model.path, out.model.create_if_missing = sft, False
    out.online.reward_model = reward_model
    out.online.bootstrap = "none"
    out.data.train = pairs
    out.lock()
    return out
