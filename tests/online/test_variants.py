"""The other training settings, 2 rounds each: ``train_on = all_rounds`` (round 2 trains on the
pairs of rounds 1 and 2) and ``reference = previous_round`` (the policy at the start of each round)."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np

from jaxalign.data.store import ArrayStore, read_store
from jaxalign.online import driver
from jaxalign.train.metrics import read_metrics

M, K, BATCH = 8, 4, 4


def reference_table(workdir, r) -> np.ndarray:
    return np.asarray(ArrayStore(os.path.join(workdir, "rounds", f"{r:04d}", "reference")).read()["logps"])


def test_all_rounds_trains_round_2_on_the_pairs_of_both_rounds(make_config, helpers, tmp_path, reference_run):
    result = driver.train(make_config(**{"online.train_on": "all_rounds"}), tmp_path / "run")
    assert result.status == "finished", result.message
    workdir = result.workdir
    pairs = {r: len(helpers.read_round(workdir, r, "pairs.jsonl")) for r in (1, 2)}
    end = {r: helpers.round_summary(workdir, r)["step"] for r in (1, 2)}
    assert end[1] == math.ceil(pairs[1] / BATCH)
    assert end[2] - end[1] == math.ceil((pairs[1] + pairs[2]) / BATCH)
    trained = {e["step"]: e["num_pairs"] for e in read_metrics(workdir) if "loss" in e}
    assert sorted(trained) == list(range(1, end[2] + 1))
    assert sum(trained[s] for s in range(1, end[1] + 1)) == pairs[1]
    assert sum(trained[s] for s in range(end[1] + 1, end[2] + 1)) == pairs[1] + pairs[2]
    # round 1 is the default run's round 1; round 2's reference pass covers its samples and round 1's pairs
    for name in ("samples.jsonl", "rewards.jsonl", "pairs.jsonl"):
        assert helpers.read_round(workdir, 1, name) == helpers.read_round(reference_run.workdir, 1, name)
    one, two = reference_table(workdir, 1), reference_table(workdir, 2)
    assert len(one) == M * K and len(two) == M * K + 2 * pairs[1]
    samples = {line["position"]: s for s, line in enumerate(helpers.read_round(workdir, 1, "samples.jsonl"))}
    earlier = [samples[p["position"]] * K + p[side] for p in helpers.read_round(workdir, 1, "pairs.jsonl")
               for side in ("chosen_sample", "rejected_sample")]
    # the same sequences under the same (initial) reference
    np.testing.assert_allclose(two[M * K:], one[earlier], rtol=0, atol=1e-4)
    assert helpers.round_summary(workdir, 2)["online/pairs"] == pairs[2]
    # each round's pairs are kept tokenized in its store (what round 2 read round 1's pairs from),
    # and a run directory without the stores (an older run) rebuilds the same examples
    run = driver.prepare(make_config(**{"online.train_on": "all_rounds"}), workdir)
    for r in (1, 2):
        stored, _ = read_store(os.path.join(workdir, "rounds", f"{r:04d}", "pairs"))
        assert isinstance(stored.tokens, np.memmap) and len(stored) == pairs[r]
        lines = {line["position"]: line for line in helpers.read_round(workdir, r, "samples.jsonl")}
        for pair, line in zip(stored, helpers.read_round(workdir, r, "pairs.jsonl"), strict=True):
            sample = lines[line["position"]]
            assert pair.index == sample["prompt_index"]
            for seq, side in zip(pair.sequences, ("chosen_sample", "rejected_sample")):
                completion = sample["completion_ids"][line[side]]
                assert seq.ids[seq.prompt_len:].tolist() == completion
        shutil.rmtree(os.path.join(workdir, "rounds", f"{r:04d}", "pairs"))
        rebuilt = driver._earlier_pairs(run, r)
        assert rebuilt.fingerprint() == stored.fingerprint() and len(rebuilt) == pairs[r]


def test_previous_round_reference_is_the_policy_at_the_start_of_the_round(make_config, helpers, tmp_path,
                                                                          reference_run):
    result = driver.train(make_config(**{"online.reference": "previous_round"}), tmp_path / "run")
    assert result.status == "finished", result.message
    workdir = result.workdir
    for r in (1, 2):
        # the reference is the policy that sampled the round: the KL is 0 in every round
        summary = helpers.round_summary(workdir, r)
        assert abs(summary["online/kl"]) < 1e-4, (r, summary["online/kl"])
        samples = np.asarray([line["logps"] for line in helpers.read_round(workdir, r, "samples.jsonl")])
        np.testing.assert_allclose(samples, reference_table(workdir, r)[: M * K].reshape(M, K), rtol=0, atol=2e-4)
    # ... while the fixed initial reference of the default run is away from the round-2 policy
    assert abs(helpers.round_summary(reference_run.workdir, 2)["online/kl"]) > 1e-3
    # round 1 is the same as with the initial reference (the same policy); the runs part after it
    assert helpers.read_round(workdir, 1, "pairs.jsonl") == helpers.read_round(reference_run.workdir, 1, "pairs.jsonl")
    assert os.path.isdir(os.path.join(workdir, "export"))


def test_all_pairs_with_a_weighted_reward_and_the_missing_eos_penalty(make_config, helpers, tmp_path):
    config = make_config(**{"online.pair_rule": "all_pairs", "online.reward_weights": (2.0,),
                            "online.missing_eos_penalty": 0.5})
    result = driver.train(config, tmp_path / "run")
    assert result.status == "finished", result.message
    workdir, name = result.workdir, helpers.reward("by_ids")
    step = 0
    for r in (1, 2):
        samples = helpers.read_round(workdir, r, "samples.jsonl")
        rewards = helpers.read_round(workdir, r, "rewards.jsonl")
        expected_pairs = []
        for m, (sample, line) in enumerate(zip(samples, rewards, strict=True)):
            raw = line["components"][name]
            assert line["rewards"] == [2.0 * v - 0.5 * (f == "length") for v, f in zip(raw, sample["finish_reasons"])]
            for i in range(K):
                for j in range(i + 1, K):
                    a, b = line["rewards"][i], line["rewards"][j]
                    if a != b:
                        expected_pairs.append((sample["position"], i, j) if a > b else (sample["position"], j, i))
        pairs = helpers.read_round(workdir, r, "pairs.jsonl")
        assert [(p["position"], p["chosen_sample"], p["rejected_sample"]) for p in pairs] == expected_pairs
        summary = helpers.round_summary(workdir, r)
        assert summary["online/pairs"] + summary["online/ties_dropped"] == M * K * (K - 1) // 2
        step += math.ceil(len(pairs) / BATCH)
        assert summary["step"] == step  # every pair trained once (online.epochs = 1)
