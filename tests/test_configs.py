"""Every recipe in configs/ loads, validates and trains a few steps through the CLI (in-process).

Tiny overrides: a tiny local model, the synthetic task, 2 steps of 4 pairs in micro-batches
of 2, a held-out evaluation for one recipe per objective kind, an HF export.
"""

from __future__ import annotations

import glob
import json
import math
import os

import pytest

from jaxalign.train.cli import main, parse_command_line
from jaxalign.train.config import base_config, flatten
from jaxalign.train.metrics import read_metrics
from jaxalign.data.synthetic import synthetic_records
from jaxalign.models.tiny import write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    records = synthetic_records(32, seed=0)
    corpus = [r["prompt"] + r[s] for r in records for s in ("chosen", "rejected")]
    path = tmp_path_factory.mktemp("recipes") / "tiny"
    write_tiny_checkpoint(path, hidden_size=32, intermediate_size=64, num_layers=1, num_kv_heads=2,
                          max_position=64, corpus=corpus)
    return str(path)


# Held-out evaluation is exercised for one recipe of each objective kind (pairwise, SFT, reward);
# the other pairwise recipes share its code path and skip it to keep the suite fast.
EVALUATED = ("dpo", "sft", "reward_model")


def tiny_overrides(model: str, evaluate: bool) -> list[str]:
    return [
        f"--config.model.path={model}", "--config.model.create_if_missing=False",
        "--config.data.train=synthetic", "--config.data.synthetic_pairs=24",
        f"--config.data.eval_pairs={8 if evaluate else 0}",
        "--config.data.batch_size=4", "--config.data.micro_batch_size=2", "--config.data.max_length=64",
        "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)", "--config.eval.batch_size=8",
        "--config.steps=2", "--config.log_every=1", "--config.eval_every=2", "--config.checkpoint_every=0",
        "--config.progress_bar=False", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
        "--config.checkpoint.export=True", "--config.checkpoint.async_save=False",
    ]


def test_recipes_exist():
    names = {os.path.basename(p)[:-3] for p in RECIPES}
    assert {"dpo", "cdpo", "ipo", "hinge", "rdpo", "vpo", "dove", "sft", "reward_model", "quickstart"} <= names


# Online recipes: one round of 4 prompts x 2 short samples, scored by a rarely-tied test function
# (the quickstart's bootstrap stages run 2 steps each and score with their reward model).
REWARD_FUNCTION = os.path.join(ROOT, "tests", "fixtures", "online_rewards.py") + ":token_sum"
ONLINE_OVERRIDES = [
    "--config.online.rounds=1", "--config.online.prompts_per_round=4", "--config.online.samples_per_prompt=2",
    "--config.online.max_new_tokens=8", "--config.online.sample_batch_size=4", "--config.online.eval_prompts=4",
    "--config.online.epochs=1",
]


def online_overrides(recipe: str) -> list[str]:
    if os.path.basename(recipe) == "online_quickstart.py":
        return [*ONLINE_OVERRIDES, "--config.online.bootstrap_sft_steps=2", "--config.online.bootstrap_reward_model_steps=2"]
    return [*ONLINE_OVERRIDES, f"--config.online.reward_function={REWARD_FUNCTION}"]


def distill_overrides(recipe: str, model: str) -> list[str]:
    """Distillation recipes: the tiny model is its own teacher (and reference): same tokenizer."""
    if os.path.basename(recipe) not in ("dckd.py", "adpa.py", "adpa_plus.py"):
        return []
    return [f"--config.distill.teacher={model}", f"--config.distill.teacher_reference={model}",
            "--config.distill.top_k=5", "--config.distill.max_new_tokens=8", "--config.steps=2"]


def is_online(recipe: str) -> bool:
    return os.path.basename(recipe).startswith("online_")


# The distillation quickstart trains five models: tests/distill/test_pipeline.py runs it.
@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.endswith("distill_quickstart.py")],
                         ids=lambda p: os.path.basename(p)[:-3])
def test_recipe_trains_a_few_steps(recipe, tiny_model, tmp_path, capsys):
    workdir = tmp_path / "run"
    name = os.path.basename(recipe)[:-3]
    argv = ["jaxalign.train", "--config", recipe, "--workdir", str(workdir), *tiny_overrides(tiny_model, name in EVALUATED)]
    if is_online(recipe):
        argv += online_overrides(recipe)
    argv += distill_overrides(recipe, tiny_model)
    config, _, _ = parse_command_line(argv)
    assert main(argv) == 0, capsys.readouterr().err
    if config.distill.pipeline == "adpa_plus":  # two stages, each a run of its own
        for stage in ("dckd", "adpa"):
            assert (workdir / "stages" / stage / "export" / "config.json").is_file()
        workdir = workdir / "stages" / "adpa"
    if is_online(recipe):
        rounds = [e for e in read_metrics(workdir) if "round" in e]
        assert [e["round"] for e in rounds] == [0, 1]
        assert rounds[1]["online/pairs"] >= 1 and math.isfinite(rounds[1]["eval/reward_mean"])
        assert (workdir / "export" / "config.json").is_file()
        return
    entries = read_metrics(workdir)
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval/loss" in e]
    assert [e["step"] for e in train] == [1, 2]
    assert all(math.isfinite(e["loss"]) and e["finite"] == 1.0 for e in train)
    if name in EVALUATED:
        assert evals and evals[-1]["step"] == 2 and math.isfinite(evals[-1]["eval/loss"])
        if config.loss.name != "sft":
            assert 0.0 <= evals[-1]["eval/rewards/accuracies"] <= 1.0
    else:
        assert not evals
    assert os.path.isdir(workdir / "checkpoints" / "2")
    assert (workdir / "export" / "config.json").is_file() and (workdir / "export" / "tokenizer.json").is_file()
    architecture = json.loads((workdir / "export" / "config.json").read_text())["architectures"][0]
    assert architecture.endswith("ForSequenceClassification") == (config.loss.name == "bradley_terry")
    assert "run directory" in capsys.readouterr().out


def test_every_config_key_the_docs_and_scripts_name_exists():
    """``--config.KEY`` in the docs, READMEs, scripts and recipes' docstrings names a real key
    (the CLI would refuse a misspelt one; the docs must not teach it)."""
    import re

    keys = set(flatten(base_config()))
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    files = [p for pattern in ("*.md", "docs/*.md", "jaxalign/**/*.md", "tools/*.sh", "configs/*.py")
             for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    named = {(os.path.relpath(p, ROOT), m) for p in files
             for m in re.findall(r"--config\.([A-Za-z_][\w.]*[A-Za-z0-9_])", open(p, encoding="utf-8").read())}
    assert len(named) > 20  # the pattern finds the flags the docs use
    unknown = sorted((p, k) for p, k in named if k not in keys | sections | {"KEY", "key"})  # placeholders
    assert not unknown, unknown
