"""The loop end to end: quickstart, resume, config mismatch, keep-best, CLI errors, plot."""

from __future__ import annotations

import math
import os
import runpy
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.models import from_pretrained
from jaxalign.train.checkpoint import RunCheckpoints
from jaxalign.train.cli import default_workdir, main
from jaxalign.train.loop import RunError, evaluate, train
from jaxalign.train.metrics import read_metrics
from jaxalign.train.run import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_shortened_run_learns_the_preference(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "quickstart"
    argv = [
        "jaxalign.train", "--config", os.path.join(ROOT, "configs", "quickstart.py"), "--workdir", str(workdir),
        f"--config.model.path={tmp_path / 'tiny-model'}", "--config.steps=24", "--config.eval_every=8",
        "--config.checkpoint_every=12", "--config.progress_bar=False", "--config.data.synthetic_pairs=320",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for what in ("metrics:", "checkpoints:", "export (HF):", str(workdir)):
        assert what in out
    entries = read_metrics(workdir)
    accuracy = {e["step"]: e["eval/rewards/accuracies"] for e in entries if "eval/rewards/accuracies" in e}
    assert sorted(accuracy) == [0, 8, 16, 24]
    assert accuracy[0] == 0.0  # policy == reference: every implicit reward is 0, ties count as wrong
    assert accuracy[24] > accuracy[0] and accuracy[24] >= 0.75
    losses = {e["step"]: e["eval/loss"] for e in entries if "eval/loss" in e}
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[24] < losses[0]
    assert all({"step", "loss"} <= set(e) for e in entries if "eval/loss" not in e)
    assert (workdir / "config.json").is_file() and (workdir / "tensorboard").is_dir()
    exported = from_pretrained(workdir / "export")
    assert exported.config.vocab_size > 0

    # tools/plot_metrics.py renders the curves
    png = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["plot_metrics.py", str(workdir), "-o", str(png)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "tools", "plot_metrics.py"), run_name="__main__")
    assert done.value.code == 0 and png.stat().st_size > 10_000

    # the same command again resumes the finished run: nothing is retrained
    assert main(argv) == 0
    assert "already at step 24: nothing left to train" in capsys.readouterr().out
    assert [e["step"] for e in read_metrics(workdir) if "loss" in e] == [e["step"] for e in entries if "loss" in e]


def test_resume_matches_uninterrupted_run(make_config, tmp_path, metrics_by_step):
    config = make_config(**{
        "steps": 7, "eval_every": 3, "checkpoint_every": 2, "data.batch_size": 8, "data.micro_batch_size": 4,
        "optimizer.warmup_steps": 2, "optimizer.schedule": "cosine", "checkpoint.keep": 1,
        "checkpoint.keep_best": "eval/loss", "checkpoint.export": True,
    })
    # 40 training pairs, 8 per step: the run crosses an epoch boundary (step 5) and reshuffles.
    full = train(config, tmp_path / "full")
    part = train(config, tmp_path / "part", stop_at_step=3)
    assert part.step == 3 and part.export_dir is None
    resumed = train(config, tmp_path / "part")
    assert resumed.resumed_from == 3 and resumed.step == full.step == 7

    a, b = metrics_by_step(tmp_path / "full"), metrics_by_step(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    pa, pb = load_file(os.path.join(full.export_dir, "model.safetensors")), load_file(
        os.path.join(resumed.export_dir, "model.safetensors"))
    assert pa.keys() == pb.keys()
    assert max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa) <= 1e-6

    # keep-best: the latest checkpoint plus the one with the lowest eval loss among the saved steps
    checkpoints = RunCheckpoints(tmp_path / "full" / "checkpoints", keep=1, keep_best="eval/loss")
    eval_loss = {s: e["eval/loss"] for s, e in a.items() if "eval/loss" in e and s in (2, 4, 6, 7)}
    best = min(eval_loss, key=eval_loss.get)
    assert checkpoints.best_step() == best
    assert set(checkpoints.all_steps()) == {best, 7}
    checkpoints.close()

    # a different config is refused, naming the key; so is a longer run whose cosine schedule would jump
    changed = make_config(**{
        "steps": 7, "eval_every": 3, "checkpoint_every": 2, "data.batch_size": 8, "data.micro_batch_size": 4,
        "optimizer.warmup_steps": 2, "optimizer.schedule": "cosine", "checkpoint.keep": 1,
        "checkpoint.keep_best": "eval/loss", "checkpoint.export": True, "loss.beta": 0.2,
    })
    with pytest.raises(RunError, match=r"loss\.beta: saved 0\.1, now 0\.2"):
        train(changed, tmp_path / "part")
    longer = make_config(**{
        "steps": 8, "eval_every": 3, "checkpoint_every": 2, "data.batch_size": 8, "data.micro_batch_size": 4,
        "optimizer.warmup_steps": 2, "optimizer.schedule": "cosine", "checkpoint.keep": 1,
        "checkpoint.keep_best": "eval/loss", "checkpoint.export": False,
    })
    with pytest.raises(RunError, match=r"steps from 7 to 8, but optimizer.schedule = 'cosine' was laid out over"):
        train(longer, tmp_path / "part")


def test_cli_rejects_unknown_and_mistyped_keys(tmp_path, capsys):
    recipe = os.path.join(ROOT, "configs", "dpo.py")
    assert main(["jaxalign.train", "--config", recipe, "--config.optimizer.learnig_rate=1e-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key --config.optimizer.learnig_rate" in err
    assert "did you mean --config.optimizer.learning_rate" in err
    assert main(["jaxalign.train", "--config", recipe, "--config.stpes=3"]) == 2
    assert "did you mean --config.steps?" in capsys.readouterr().err
    assert main(["jaxalign.train", "--config", recipe, "--config.steps=2.5"]) == 2
    assert "--config.steps=2.5" in capsys.readouterr().err
    argv = ["jaxalign.train", "--config", recipe, "--config.loss.name=dpoo", "--config.model.path=m", "--config.data.train=d"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'loss.name' = 'dpoo' is not allowed (did you mean 'dpo'?)" in err and "bradley_terry" in err
    assert main(["jaxalign.train", "--config", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    # the recipe's placeholders must be filled: the error names the keys
    assert main(["jaxalign.train", "--config", recipe, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "'data.train' is empty" in err and "'model.path' is empty" in err
    assert not (tmp_path / "w").exists()


def test_epochs_set_the_number_of_steps(make_config, tmp_path):
    config = make_config(**{"steps": 0, "epochs": 1.5, "data.batch_size": 8, "data.micro_batch_size": 4})
    run = prepare(config, str(tmp_path / "w"))
    # 48 records, 8 held out: 40 training pairs = 10 micro-batches of 4 = 5 steps of 8 per epoch
    assert len(run.train_loader.examples) == 40 and len(run.eval_loader.examples) == 8
    assert run.accum == 2 and run.total_steps == math.ceil(1.5 * 5)


def test_eval_is_the_pair_weighted_mean_over_its_batches(make_config, tmp_path, reference_model_dir):
    # 8 held-out pairs; a reference other than the policy, so that every metric varies by pair
    config = make_config(**{"reference.path": reference_model_dir})
    whole = prepare(config, str(tmp_path / "one"))
    expected = evaluate(whole, whole.state.params)
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= expected.keys()
    assert expected["eval/rewards/margins"] != 0
    split = prepare(make_config(**{"reference.path": reference_model_dir, "eval.batch_size": 3}), str(tmp_path / "three"))
    assert [int(b["pair_mask"].sum()) for b in split.eval_loader] == [3, 3, 2]
    got = evaluate(split, split.state.params)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # float32 sums of ~100
    assert evaluate(split, split.state.params) == got  # the loader is rewound: the same pairs again

    first_only = prepare(make_config(**{"reference.path": reference_model_dir, "eval.batch_size": 3,
                                        "eval.max_batches": 1}), str(tmp_path / "first"))
    assert evaluate(first_only, first_only.state.params)["eval/loss"] != pytest.approx(expected["eval/loss"], abs=1e-6)


def test_default_workdir_is_the_recipe_name_under_runs():
    assert default_workdir("configs/dpo.py:arg") == os.path.join("runs", "dpo")

