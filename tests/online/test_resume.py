"""kill -9 in each phase of round 2 (``debug.kill_at = 2:PHASE``), then the same command again:
the run ends with the parameters, round files and metrics of the uninterrupted ``reference_run``,
bit for bit (``python -m jaxalign.train`` in subprocesses)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from jaxalign.train.metrics import HARDWARE_METRICS, read_metrics

TIMINGS = ("time/generate_s", "time/score_s", "time/reference_s", "time/train_s", "sampling/tokens_per_s")
ROUND_FILES = ("samples.jsonl", "rewards.jsonl", "pairs.jsonl")


def without_timings(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in TIMINGS and k not in HARDWARE_METRICS}


def round_one_end(reference_run) -> int:
    with open(os.path.join(reference_run.workdir, "rounds", "0001", "summary.json")) as f:
        return json.load(f)["step"]


@pytest.mark.parametrize("phase", ["sample", "score", "train"])
def test_kill_9_in_a_phase_then_resume_matches_the_uninterrupted_run(phase, reference_run, tmp_path, cli_env,
                                                                      helpers):
    recipe = helpers.write_recipe(reference_run.config, tmp_path / "recipe.py")
    workdir = tmp_path / "run"
    killed = helpers.run_cli(recipe, workdir, cli_env, f"--config.debug.kill_at=2:{phase}")
    assert killed.returncode == -signal.SIGKILL, f"exit {killed.returncode}:\n{killed.stderr[-3000:]}"

    # what the kill left: round 1 complete, round 2 stopped in the phase
    two = workdir / "rounds" / "0002"
    assert helpers.round_summary(workdir, 1) is not None and helpers.round_summary(workdir, 2) is None
    end_of_one = round_one_end(reference_run)
    written = {"sample": set(), "score": {"samples.jsonl", "timings.json"},
               "train": {"samples.jsonl", "rewards.jsonl", "pairs.jsonl", "pairs", "reference", "timings.json"}}[phase]
    assert (set(os.listdir(two)) if two.exists() else set()) == written
    # the checkpoints: the end of round 1, and in training one step of round 2 (checkpoint_every = 1)
    assert max(helpers.checkpoint_steps(workdir)) == end_of_one + (phase == "train")

    kept = {name: os.stat(two / name).st_mtime_ns for name in written if name.endswith(".jsonl")}

    resumed = helpers.run_cli(recipe, workdir, cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {end_of_one + (phase == 'train')}" in resumed.stdout
    # only the unfinished phase was redone: the files of the finished ones were read, not rewritten
    assert {name: os.stat(two / name).st_mtime_ns for name in kept} == kept
    expected, got = helpers.export_params(reference_run.workdir), helpers.export_params(workdir)
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not np.array_equal(expected[k], got[k])]
    assert not differing, f"kill at 2:{phase}: parameters differ from the uninterrupted run: {differing}"
    for r in (1, 2):
        for name in ROUND_FILES:
            assert helpers.read_round(workdir, r, name) == helpers.read_round(reference_run.workdir, r, name), \
                f"kill at 2:{phase}: rounds/{r:04d}/{name} differs"
    # (timings differ; a phase read from disk reports the seconds it took when it ran, from timings.json)
    for r in (0, 1, 2):
        resumed, uninterrupted = helpers.round_summary(workdir, r), helpers.round_summary(reference_run.workdir, r)
        assert without_timings(resumed) == without_timings(uninterrupted)
        assert resumed.keys() == uninterrupted.keys()
    # one metrics row per step and per round, with the uninterrupted run's values
    a = [without_timings(e) for e in read_metrics(reference_run.workdir)]
    b = [without_timings(e) for e in read_metrics(workdir)]
    assert b == a


def test_rounds_since_the_newest_checkpoint_are_trained_again_from_their_files(reference_run, tmp_path, cli_env,
                                                                                helpers):
    """``online.checkpoint_rounds = 2``: after round 1 nothing is saved; killed in round 2's
    sampling, the resumed run trains round 1 again from its files (without sampling, scoring
    or evaluating it again) and ends with the uninterrupted run's parameters."""
    config = helpers.set_keys(reference_run.config.copy_and_resolve_references(),
                              {"online.checkpoint_rounds": 2, "checkpoint_every": 0})
    recipe = helpers.write_recipe(config, tmp_path / "recipe.py")
    workdir = tmp_path / "run"
    killed = helpers.run_cli(recipe, workdir, cli_env, "--config.debug.kill_at=2:sample")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert helpers.checkpoint_steps(workdir) == [] and helpers.round_summary(workdir, 1) is not None
    summary_one = os.stat(workdir / "rounds" / "0001" / "summary.json").st_mtime_ns
    resumed = helpers.run_cli(recipe, workdir, cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round 1: training it again from its files" in resumed.stdout
    assert os.stat(workdir / "rounds" / "0001" / "summary.json").st_mtime_ns == summary_one
    a, b = helpers.export_params(reference_run.workdir), helpers.export_params(workdir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [without_timings(e) for e in read_metrics(workdir) if "round" in e] == \
        [without_timings(e) for e in read_metrics(reference_run.workdir) if "round" in e]
