"""What a new user meets first: no silent failure, no traceback, a word where a default surprises."""

from __future__ import annotations

import json
import math
import os

import pytest

from jaxalign.train.cli import EXIT_NONFINITE, EXIT_USAGE, main
from jaxalign.train.loop import RunResult, _unusable_result, train
from jaxalign.train.run import RunError, prepare
from jaxalign.train.runner import Outcome

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sequences_longer_than_the_model_context_are_refused_before_loading(make_config, tmp_path, recipe_file,
                                                                             capsys):
    """The tiny model has 128 positions; max_length 256 is a RunError naming both (exit 2)."""
    config = make_config(**{"data.max_length": 256, "data.buckets": (256,)})
    with pytest.raises(RunError, match=r"data.max_length = 256 exceeds the context of the model at model.path .*"
                                       r"128 positions"):
        prepare(config, str(tmp_path / "w"))
    assert main(["prog", "--config", recipe_file(config, tmp_path / "r.py"), "--workdir", str(tmp_path / "c")]) \
        == EXIT_USAGE
    assert "--config.data.max_length=128 or less" in capsys.readouterr().err


def test_a_run_that_applied_no_step_exits_nonzero_and_exports_nothing(make_config, tmp_path, recipe_file, capsys):
    """Every step non-finite (the guard never halts: max_consecutive_nonfinite 0): status nonfinite, exit 3."""
    config = make_config(**{"debug.nan_at_steps": (1, 2), "max_consecutive_nonfinite": 0, "checkpoint.export": True})
    result = train(config, tmp_path / "run")
    assert result.status == "nonfinite" and result.export_dir is None
    assert "no step was applied: all 2 steps had a non-finite loss" in result.message
    assert main(["prog", "--config", recipe_file(config, tmp_path / "r.py"), "--workdir", str(tmp_path / "c")]) \
        == EXIT_NONFINITE
    assert "no step was applied" in capsys.readouterr().err


def test_a_non_finite_final_eval_is_not_a_success():
    class State:
        step, nonfinite_steps = 5, 1

    good = Outcome(State(), 5, "finished", "", {}, {"eval/loss": 0.6})
    assert _unusable_result(good) == ""
    bad = Outcome(State(), 5, "finished", "", {}, {"eval/loss": math.nan, "eval/rewards/margins": 0.1})
    assert "the final eval is not finite (eval/loss = nan)" in _unusable_result(bad)


def test_a_bad_record_error_says_how_to_skip(make_config, tmp_path, data_file):
    rows = open(data_file, encoding="utf-8").read().splitlines()
    record = json.loads(rows[3])
    record["chosen"] = ""
    rows[3] = json.dumps(record)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(RunError, match=r"pairs.jsonl:4.*\n\(to skip such records .* --config.data.on_bad_record=skip"):
        prepare(make_config(**{"data.train": str(path)}), str(tmp_path / "w"))


def test_a_warmup_longer_than_the_run_is_warned_and_the_first_step_says_compiling(make_config, tmp_path, capsys):
    train(make_config(**{"optimizer.warmup_steps": 10, "progress_bar": True}), tmp_path / "run")
    err = capsys.readouterr().err
    assert "warning: optimizer.warmup_steps = 10 >= the run's 2 steps: the learning rate never reaches its peak" in err
    assert "compiling" in err


def test_the_summary_of_a_rerun_or_interrupted_run_says_what_happened(tmp_path):
    common = dict(workdir=str(tmp_path), metrics_file="m", checkpoint_dir="c", export_dir=None, train_metrics={},
                  eval_metrics={"eval/loss": 0.5}, is_main_process=True)
    rerun = RunResult(step=4, resumed_from=4, **common).summary()
    assert "already at step 4: nothing left to train" in rerun and "resumed from" not in rerun
    interrupted = RunResult(step=3, resumed_from=None, status="interrupted", **common).summary()
    assert "last eval:" in interrupted and "final eval" not in interrupted
    assert "pip install tensorboard" in interrupted


def test_help_lists_the_recipes_and_print_config_documents_every_key(capsys):
    from jaxalign.train.cli import main as cli_main
    from jaxalign.train.config import base_config, flatten

    assert cli_main(["prog", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Recipes (" in out and "dpo, hinge, ipo" in out and "--print-config" in out
    recipe = os.path.join(ROOT, "configs", "dpo.py")
    # --config.KEY before --config FILE works; the config need not be complete to be printed.
    assert cli_main(["prog", "--config.steps=3", "--config", recipe, "--print-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(flatten(base_config())) and all("  # " in line for line in lines)
    assert "steps = 3  # total optimizer steps; 0 = derive from `epochs`" in lines


def test_sft_trains_on_the_chosen_responses_of_preference_data(make_config, tmp_path, data_file, records):
    """The SFT recipe accepts preference pairs (the usual step before DPO): prompt + chosen."""
    from jaxalign.data.dataset import load_dataset
    from jaxalign.tokenizers import load_tokenizer

    config = make_config(**{"loss.name": "sft", "reference.mode": "none", "data.train": data_file})
    tokenizer = load_tokenizer(config.model.path)
    sft = load_dataset(data_file, tokenizer, max_length=64, max_prompt_length=32, family="sft")
    pairs = load_dataset(data_file, tokenizer, max_length=64, max_prompt_length=32, family="preference")
    assert len(sft) == len(pairs) == len(records)
    for example, pair in zip(sft.examples, pairs.examples):
        assert example.sequence.ids.tolist() == pair.chosen.ids.tolist()
        assert example.sequence.prompt_len == pair.chosen.prompt_len
    result = train(config, tmp_path / "run")
    assert result.status == "finished" and math.isfinite(result.train_metrics["loss"])


def test_data_check_and_the_trainer_share_options_and_defaults(make_config, tmp_path, records):
    """Renamed columns work in the trainer as in data.check, with the same length defaults."""
    from jaxalign.data.check import _parser
    from jaxalign.train.config import base_config

    args = _parser().parse_args(["x.jsonl"])
    data = base_config().data
    assert (args.max_length, args.max_prompt_length) == (data.max_length, data.max_prompt_length)
    assert (args.prompt_key, args.chosen_key, args.rejected_key) == (data.prompt_key, data.chosen_key,
                                                                     data.rejected_key)
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
                            for r in records), encoding="utf-8")
    config = make_config(**{"data.train": str(path), "data.eval_pairs": 0})
    with pytest.raises(RunError, match="renamed.jsonl:1"):
        prepare(config, str(tmp_path / "a"))
    renamed = make_config(**{"data.train": str(path), "data.eval_pairs": 0, "data.prompt_key": "question",
                             "data.chosen_key": "good", "data.rejected_key": "bad"})
    assert len(prepare(renamed, str(tmp_path / "b")).train_loader.examples) == len(records)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(make_config, tmp_path):
    """Ids past the embedding would be clamped silently by the lookup: refused at start-up."""
    from jaxalign.tokenizers import build_bpe_tokenizer, load_tokenizer

    build_bpe_tokenizer(tmp_path / "big", vocab_size=4096)  # trained on the HH-RLHF fixture
    config = make_config(**{"model.tokenizer": str(tmp_path / "big")})
    assert len(load_tokenizer(tmp_path / "big")) > 1024
    with pytest.raises(RunError, match=r"has \d+ tokens, more than the model's vocabulary of \d+"):
        prepare(config, str(tmp_path / "w"))
