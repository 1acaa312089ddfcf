"""What an online run does when its reward or its prompts are wrong, through the command line
(``jaxalign.train.cli.main``, in process): a reward function that raises or returns bad values
stops the run with exit code 1 and a message naming it and a prompt, keeping the round's
samples; a round where every group ties is skipped with a warning; no prompt is exit code 2."""

from __future__ import annotations

import os

import pytest

from jaxalign.train.cli import main
from jaxalign.train.metrics import read_metrics


@pytest.fixture
def cli(helpers, capsys):
    """``cli(config, workdir) -> (exit code, stdout, stderr)`` of ``python -m jaxalign.train``."""

    def run(config, workdir):
        recipe = helpers.write_recipe(config, f"{workdir}-recipe.py")
        code = main(["jaxalign.train", "--config", recipe, "--workdir", str(workdir)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def first_prompt(helpers, workdir, where=lambda line: True) -> str:
    return next(line["prompt"] for line in helpers.read_round(workdir, 1, "samples.jsonl") if where(line))


def test_a_reward_function_that_raises_stops_the_run_with_exit_1_and_keeps_the_samples(
        make_config, helpers, cli, tmp_path, reference_run):
    name = helpers.reward("raises")
    config = make_config(**{"online.reward_function": name, "online.eval_reward_function": helpers.reward("by_ids")})
    workdir = tmp_path / "run"
    code, _, err = cli(config, workdir)
    assert code == 1, err
    assert os.path.isfile(workdir / "rounds" / "0001" / "samples.jsonl")
    assert not os.path.exists(workdir / "rounds" / "0001" / "rewards.jsonl")
    assert helpers.round_summary(workdir, 1) is None and helpers.round_summary(workdir, 0) is not None
    # the first failing prompt: the first of the round (prompt-major) whose row has an odd tag (= row index)
    culprit = first_prompt(helpers, workdir, lambda line: line["prompt_index"] % 2 == 1)
    assert f"error: round 1: reward function {name!r} raised ValueError: no reward for odd tag" in err
    assert f"(first failing prompt: {culprit!r})" in err
    assert f"the round's generations are kept in {workdir}/rounds/0001/samples.jsonl" in err
    samples = os.stat(workdir / "rounds" / "0001" / "samples.jsonl").st_mtime_ns

    # with the function fixed, the same command scores the kept samples and finishes the run
    config.online.reward_function = helpers.reward("by_ids")
    code, out, err = cli(config, workdir)
    assert code == 0, err
    assert os.stat(workdir / "rounds" / "0001" / "samples.jsonl").st_mtime_ns == samples
    for r in (1, 2):
        for file in ("samples.jsonl", "rewards.jsonl", "pairs.jsonl"):
            assert helpers.read_round(workdir, r, file) == helpers.read_round(reference_run.workdir, r, file)


@pytest.mark.parametrize("function, expected", [
    ("wrong_length", "returned 31 values for 32 completions (one per completion, prompt-major)"),
    ("nan", "returned nan for completion 0 of prompt {first!r}: every reward must be a finite number"),
    ("none", "returned None for completion 1 of prompt {first!r}"),
    ("string", "returned 'good' for completion 0 of prompt {first!r}"),
])
def test_a_reward_function_with_bad_values_stops_the_run_with_exit_1(function, expected, make_config, helpers, cli,
                                                                      tmp_path):
    name = helpers.reward(function)
    # no held-out prompts: round 0 has nothing to score, the error comes from round 1's rewards
    config = make_config(**{"online.reward_function": name, "online.eval_prompts": 0})
    workdir = tmp_path / "run"
    code, _, err = cli(config, workdir)
    assert code == 1, err
    assert os.path.isfile(workdir / "rounds" / "0001" / "samples.jsonl")
    assert f"error: round 1: reward function {name!r} " in err
    assert expected.format(first=first_prompt(helpers, workdir)) in err


def test_an_eval_reward_that_fails_is_exit_1_too(make_config, helpers, cli, tmp_path):
    name = helpers.reward("nan")
    config = make_config(**{"online.eval_reward_function": name})
    code, _, err = cli(config, tmp_path / "run")
    assert code == 1, err
    assert f"error: eval: reward function {name!r} returned nan" in err


def test_a_round_where_every_group_ties_is_skipped_with_a_warning(make_config, helpers, cli, tmp_path):
    config = make_config(**{"online.reward_function": helpers.reward("constant")})
    workdir = tmp_path / "run"
    code, out, err = cli(config, workdir)
    assert code == 0, err
    for r in (1, 2):
        assert (f"warning: round {r}: every group of 4 completions tied (online.tie_margin = 0.0): no pair, the "
                "round is skipped") in err
        assert helpers.read_round(workdir, r, "pairs.jsonl") == []
    rows = [e for e in read_metrics(workdir) if "round" in e]
    assert [e["round"] for e in rows] == [0, 1, 2]
    assert [(e["online/pairs"], e["online/ties_dropped"], e["online/rounds_skipped"]) for e in rows[1:]] == \
        [(0, 8, 1), (0, 8, 2)]
    assert [e["step"] for e in rows] == [0, 0, 0] and not [e for e in read_metrics(workdir) if "loss" in e]
    assert "(step 0)" in out


def test_an_empty_prompt_file_is_exit_2(make_config, cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = cli(make_config(**{"data.train": str(empty)}), tmp_path / "run")
    assert code == 2
    assert f"error: data: {empty}: no usable prompt" in err


def test_a_bad_prompt_row_is_exit_2_naming_its_line(make_config, cli, tmp_path, records):
    import json

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + '{"prompt": 7}\n')
    code, _, err = cli(make_config(**{"data.train": str(bad)}), tmp_path / "run")
    assert code == 2
    assert f"error: data: {bad}:4: prompt" in err and "--config.data.on_bad_record=skip" in err


def test_a_prompt_column_named_like_a_reward_argument_is_exit_2(make_config, cli, tmp_path, records):
    import json

    clashing = tmp_path / "clash.jsonl"
    clashing.write_text("".join(json.dumps(dict(r, stopped=True)) + "\n" for r in records))
    code, _, err = cli(make_config(**{"data.train": str(clashing)}), tmp_path / "run")
    assert code == 2
    assert "column(s) ['stopped']" in err and "rename" in err


def test_a_reward_function_that_cannot_be_loaded_is_exit_2(make_config, helpers, cli, tmp_path):
    name = helpers.reward("no_such_function")
    code, _, err = cli(make_config(**{"online.reward_function": name}), tmp_path / "run")
    assert code == 2
    assert f"error: reward function {name!r}: " in err and "has no function 'no_such_function'" in err
