"""A 2-round online DPO run of the tiny model (``reference_run``): the round files and their
documented fields, the metrics rows, the pairs against the rewards, the KL at round 1."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxalign.data.store import ArrayStore
from jaxalign.online.prompts import at_positions, load_prompts, split_eval
from jaxalign.tokenizers import stop_ids
from jaxalign.train.metrics import read_metrics

M, K, T, ROUNDS = 8, 4, 10, 2
ROUND_KEYS = (
    "round", "online/reward_mean", "online/reward_std", "online/reward_best_of_k", "online/pairs",
    "online/ties_dropped", "online/stop_rate", "online/completion_length", "online/kl", "time/generate_s",
    "time/score_s", "time/train_s", "sampling/tokens_per_s", "eval/reward_mean",
)


def by_ids(ids) -> float:  # reward_fns.by_ids, one completion
    return (sum((i + 1) * t for i, t in enumerate(ids)) % 97) / 10.0


@pytest.fixture(scope="module")
def workdir(reference_run):
    return reference_run.workdir


@pytest.fixture(scope="module")
def rounds(workdir, helpers):
    names = ("samples.jsonl", "rewards.jsonl", "pairs.jsonl")
    return {r: {name: helpers.read_round(workdir, r, name) for name in names}
            for r in range(1, ROUNDS + 1)}


def test_the_run_finishes_and_writes_every_round(reference_run, workdir):
    assert reference_run.status == "finished" and reference_run.export_dir == os.path.join(workdir, "export")
    assert sorted(os.listdir(os.path.join(workdir, "rounds"))) == ["0000", "0001", "0002"]
    assert os.listdir(os.path.join(workdir, "rounds", "0000")) == ["summary.json"]
    for r in (1, 2):
        names = set(os.listdir(os.path.join(workdir, "rounds", f"{r:04d}")))
        assert names == {"samples.jsonl", "rewards.jsonl", "pairs.jsonl", "pairs", "reference", "timings.json",
                         "summary.json"}, names


def test_samples_hold_the_documented_fields(rounds, reference_run, tokenizer, records, tiny_model_dir):
    config = reference_run.config
    every = load_prompts(config.data.train, tokenizer, max_prompt_length=32).prompts
    train_prompts, held = split_eval(every, 4, config.seed)
    stops = set(stop_ids(tokenizer, tiny_model_dir))
    for r in (1, 2):
        lines = rounds[r]["samples.jsonl"]
        positions = np.arange((r - 1) * M, r * M)
        assert [line["position"] for line in lines] == positions.tolist()
        expected = [train_prompts[i] for i in at_positions(positions, len(train_prompts), config.seed)]
        assert [line["prompt_index"] for line in lines] == [p.index for p in expected]
        assert not {p.index for p in held} & {line["prompt_index"] for line in lines}  # never an eval prompt
        for line in lines:
            assert set(line) == {"position", "prompt_index", "prompt", "completions", "completion_ids",
                                 "finish_reasons", "logps"}
            assert line["prompt"] == records[line["prompt_index"]]["prompt"]
            assert len(line["completions"]) == len(line["completion_ids"]) == len(line["finish_reasons"]) == K
            for text, ids, finish, logp in zip(line["completions"], line["completion_ids"], line["finish_reasons"],
                                               line["logps"]):
                assert 1 <= len(ids) <= T and finish in ("stop", "length")
                assert (finish == "stop") == (ids[-1] in stops and not set(ids[:-1]) & stops)
                if finish == "length":
                    assert len(ids) == T
                assert text == tokenizer.decode(ids[:-1] if finish == "stop" else ids, skip_special_tokens=True)
                assert logp < 0


def test_rewards_are_the_reward_function_of_the_samples(rounds, helpers):
    name = helpers.reward("by_ids")
    for r in (1, 2):
        for sample, line in zip(rounds[r]["samples.jsonl"], rounds[r]["rewards.jsonl"], strict=True):
            assert set(line) == {"position", "rewards", "components"} and line["position"] == sample["position"]
            expected = [by_ids(ids) for ids in sample["completion_ids"]]
            assert line["rewards"] == expected and line["components"] == {name: expected}


def test_pairs_are_best_versus_worst_of_the_rewards(rounds):
    for r in (1, 2):
        samples = {line["position"]: line for line in rounds[r]["samples.jsonl"]}
        expected = []
        for line in rounds[r]["rewards.jsonl"]:
            rewards = np.asarray(line["rewards"])
            best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
            if rewards[best] > rewards[worst]:
                expected.append((line["position"], best, worst))
        pairs = rounds[r]["pairs.jsonl"]
        assert [(p["position"], p["chosen_sample"], p["rejected_sample"]) for p in pairs] == expected
        assert len(pairs) >= 5  # the by_ids reward rarely ties: the rounds have 2 steps of 4 pairs
        for p in pairs:
            s = samples[p["position"]]
            assert set(p) == {"position", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward",
                              "chosen_sample", "rejected_sample"}
            assert p["prompt"] == s["prompt"]
            assert (p["chosen"], p["rejected"]) == (s["completions"][p["chosen_sample"]],
                                                    s["completions"][p["rejected_sample"]])
            rewards = next(line["rewards"] for line in rounds[r]["rewards.jsonl"] if line["position"] == p["position"])
            assert (p["chosen_reward"], p["rejected_reward"]) == (max(rewards), min(rewards))


def test_metrics_have_one_row_per_round_with_every_key(workdir, rounds, helpers):
    rows = [e for e in read_metrics(workdir) if "round" in e]
    assert [e["round"] for e in rows] == [0, 1, 2]
    assert "eval/reward_mean" in rows[0] and rows[0]["step"] == 0
    for r in (1, 2):
        row = rows[r]
        missing = [k for k in ROUND_KEYS if k not in row]
        assert not missing, f"round {r} lacks {missing}"
        assert all(np.isfinite(row[k]) for k in ROUND_KEYS)
        summary = helpers.round_summary(workdir, r)
        assert {k: v for k, v in summary.items()} == {k: v for k, v in row.items()}  # the same numbers
        rewards = np.asarray([line["rewards"] for line in rounds[r]["rewards.jsonl"]])
        samples = rounds[r]["samples.jsonl"]
        pairs = len(rounds[r]["pairs.jsonl"])
        assert row["online/reward_mean"] == pytest.approx(rewards.mean(), abs=1e-12)
        assert row["online/reward_std"] == pytest.approx(rewards.std(), abs=1e-12)
        assert row["online/reward_best_of_k"] == pytest.approx(rewards.max(axis=1).mean(), abs=1e-12)
        assert (row["online/pairs"], row["online/ties_dropped"]) == (pairs, M - pairs)
        finishes = [f for s in samples for f in s["finish_reasons"]]
        assert row["online/stop_rate"] == pytest.approx(finishes.count("stop") / (M * K))
        assert row["online/completion_length"] == pytest.approx(
            np.mean([len(ids) for s in samples for ids in s["completion_ids"]]))
        assert row["online/rounds_skipped"] == 0
        assert row["time/generate_s"] > 0 and row["time/train_s"] > 0 and row["sampling/tokens_per_s"] > 0
    # the rows sit at the round's last step: 2 steps of 4 pairs a round
    assert [rows[r]["step"] for r in (1, 2)] == [2, 4]
    train_rows = [e for e in read_metrics(workdir) if "loss" in e]
    assert [e["step"] for e in train_rows] == [1, 2, 3, 4]


def test_kl_is_the_sampling_minus_reference_log_probs_and_zero_at_round_1(workdir, rounds, helpers):
    for r in (1, 2):
        table = ArrayStore(os.path.join(workdir, "rounds", f"{r:04d}", "reference")).read()["logps"]
        logps = np.asarray([s["logps"] for s in rounds[r]["samples.jsonl"]])
        reference = np.asarray(table[: M * K]).reshape(M, K)
        assert helpers.round_summary(workdir, r)["online/kl"] == pytest.approx((logps - reference).mean(), abs=1e-9)
        if r == 1:  # the policy is the reference: the sampler's and the forward pass's log-probs agree
            np.testing.assert_allclose(logps, reference, rtol=0, atol=2e-4)
            assert abs(helpers.round_summary(workdir, r)["online/kl"]) < 1e-4
        else:  # after a round of training the policy moved away from the initial reference
            assert np.abs(logps - reference).max() > 1e-2


def test_running_a_finished_run_again_changes_nothing(reference_run, helpers, tmp_path):
    import shutil

    from jaxalign.online.driver import train

    copy = tmp_path / "again"
    shutil.copytree(reference_run.workdir, copy)
    before = read_metrics(copy)
    result = train(reference_run.config, copy)
    assert (result.status, result.step, result.resumed_from) == ("finished", 4, 4)
    assert read_metrics(copy) == before  # no round redone, no row written twice
    expected, got = helpers.export_params(reference_run.workdir), helpers.export_params(copy)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
