"""Online VPO (loss vpo, vpo_mode online, calibration samples of the reference): one calibration
sample per prompt, drawn from the reference with the calibration seed and reused in later
rounds, and the logged ``vpo/regularizer`` of every step equal to
``alpha * beta * mean(log pi(y_cal) - log pi_ref(y_cal))`` recomputed from the checkpoint of
the step before (the parameters the step started from) on the same calibration samples."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxalign.data.encoding import EncodedSequence
from jaxalign.online import driver
from jaxalign.sampling import sample
from jaxalign.train.checkpoint import RunCheckpoints, abstract_like
from jaxalign.train.metrics import read_metrics

ALPHA, BETA = 1.0, 0.1
STEPS_OF_ROUND = {1: 1, 2: 1, 3: 2, 4: 2}  # 8 prompts, one batch of up to 8 pairs, 2 epochs a round


@pytest.fixture(scope="module")
def vpo_run(make_config, records, tmp_path_factory):
    root = tmp_path_factory.mktemp("vpo")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    # 8 prompts, 8 a round, none held out: every round samples every prompt once
    config = make_config(**{
        "loss.name": "vpo", "loss.vpo_mode": "online", "loss.vpo_calibration": "reference_samples",
        "loss.vpo_alpha": ALPHA, "loss.beta": BETA, "data.train": str(prompts), "online.eval_prompts": 0,
        "data.batch_size": 8, "online.epochs": 2, "checkpoint_every": 1, "checkpoint.keep": 10,
    })
    result = driver.train(config, root / "run")
    assert result.status == "finished", result.message
    return config, result.workdir, driver.prepare(config, result.workdir)


def calibration(helpers, workdir, r) -> dict[int, list[int]]:
    lines = helpers.read_round(workdir, r, "calibration.jsonl")
    assert [line["prompt_index"] for line in lines] == sorted({line["prompt_index"] for line in lines})  # one each
    return {line["prompt_index"]: line["completion_ids"] for line in lines}


def trained_prompts(helpers, workdir, r) -> list[int]:
    """The prompt index of each of round ``r``'s pairs, in pair order."""
    index = {line["position"]: line["prompt_index"] for line in helpers.read_round(workdir, r, "samples.jsonl")}
    return [index[p["position"]] for p in helpers.read_round(workdir, r, "pairs.jsonl")]


def test_one_calibration_sample_per_prompt_from_the_reference_reused_across_rounds(vpo_run, helpers):
    config, workdir, run = vpo_run
    assert [helpers.round_summary(workdir, r)["step"] for r in (1, 2)] == [2, 4]
    cal = {r: calibration(helpers, workdir, r) for r in (1, 2)}
    for r in (1, 2):
        assert set(cal[r]) == set(trained_prompts(helpers, workdir, r))  # the prompts of the round's pairs
        assert all(1 <= len(ids) <= config.online.max_new_tokens for ids in cal[r].values())
    repeated = set(cal[1]) & set(cal[2])
    assert repeated  # every prompt is in both rounds; a prompt without a pair in one of them is not repeated
    assert {i: cal[2][i] for i in repeated} == {i: cal[1][i] for i in repeated}  # reused, not sampled again
    # the samples are the reference's (the initial policy), 1 per prompt, seeded by the calibration stream and
    # the prompt index: round 2's were not drawn from the trained policy
    indices = sorted(set(cal[1]) | set(cal[2]))
    sampling = dataclasses.replace(run.sampling, num_samples=1, seed=config.seed + driver.CALIBRATION_SEED_OFFSET)
    out = sample(run.graphdef, run.initial_reference, [run.train_prompts[i].ids for i in indices], sampling,
                 mesh=run.mesh, prompt_indices=indices)
    drawn = {i: out.tokens[row, 0][out.mask[row, 0] == 1].tolist() for row, i in enumerate(indices)}
    assert {**cal[1], **cal[2]} == drawn


def test_the_logged_regularizer_is_alpha_beta_mean_calibration_log_ratio(vpo_run, helpers):
    config, workdir, run = vpo_run
    checkpoints = RunCheckpoints(f"{workdir}/checkpoints")
    logged = {e["step"]: e for e in read_metrics(workdir) if "vpo/regularizer" in e}
    assert sorted(logged) == [1, 2, 3, 4]
    for step, r in STEPS_OF_ROUND.items():
        cal = calibration(helpers, workdir, r)
        sequences = []
        for i in trained_prompts(helpers, workdir, r):
            prompt = run.train_prompts[i].ids
            sequences.append(EncodedSequence(ids=np.concatenate([prompt, cal[i]]).astype(np.int32),
                                             prompt_len=len(prompt), has_bos=int(prompt[0]) == run.bos_id))
        # the parameters step `step` started from: the initial policy, then the checkpoint of the step before
        params = (run.state.params["model"] if step == 1 else
                  checkpoints.restore(step - 1, abstract_like(run.state))[0].params["model"])
        policy = driver.sequence_logps(run, params, sequences)
        reference = driver.sequence_logps(run, run.initial_reference, sequences)
        ratio = float(np.mean(policy - reference))
        expected = ALPHA * BETA * ratio  # vpo_mode online: sign +1
        got = logged[step]
        assert got["vpo/calibration_logratio"] == pytest.approx(ratio, rel=1e-5, abs=1e-7), step
        assert got["vpo/regularizer"] == pytest.approx(expected, rel=1e-5, abs=1e-8), step
        if step == 1:  # the policy is the reference
            assert abs(got["vpo/regularizer"]) < 1e-5
        else:  # training moved it: the check is not 0 == 0
            assert abs(expected) > 1e-4, step
    checkpoints.close()
