"""Objectives plug into the trainer through its public builders, and nothing is silently dropped.

The toy objective here lives in this test module only: one loss function plus the batch key it
reads (a per-token weight array carried by the batches as side data). A driver of a dozen lines
(builders + step runner) trains with it, the proof that a new loss or driver needs no change to
``jaxalign/train``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.batching import padded_batch, stack_micro_batches
from jaxalign.objectives import Objective, from_config, real_token_mask, sft
from jaxalign.runtime.preemption import StopSignals
from jaxalign.runtime.profiling import StepTrace
from jaxalign.train import build
from jaxalign.train.batches import BatchPlacer, check_keys
from jaxalign.train.checkpoint import RunCheckpoints
from jaxalign.train.metrics import MetricsLog, Progress
from jaxalign.train.runner import Cadence, StepRunner
from jaxalign.train.step import device_keys


def weighted_nll(forward, params, batch, reference):
    """Token-weighted NLL: ``-sum(w * logp) / sum(mask)`` over the real scored tokens."""
    mask = real_token_mask(batch)
    logps = forward.token_logps(params["model"], batch)
    loss = -jnp.sum(batch["token_weights"] * logps * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"toy/weight_sum": jnp.sum(batch["token_weights"] * mask)}


TOY = Objective(name="toy", loss_fn=weighted_nll, unit="tokens", batch_keys=("token_weights",))


def _with_weights(pair, weight):
    """The pair with a ``token_weights`` side array: ``weight`` on completion tokens, 0 on the prompt."""
    def seq(s):
        w = np.where(np.arange(len(s)) >= s.prompt_len, weight, 0.0).astype(np.float32)
        return dataclasses.replace(s, side={"token_weights": w})
    return dataclasses.replace(pair, chosen=seq(pair.chosen), rejected=seq(pair.rejected))


@pytest.fixture(scope="module")
def parts(make_config, tmp_path_factory):
    config = make_config(**{"data.eval_pairs": 0, "reference.mode": "none", "optimizer.learning_rate": 1e-2,
                            "optimizer.schedule": "constant"})
    mesh = build.build_mesh(config.mesh)
    config = build.resolve_inputs(config, str(tmp_path_factory.mktemp("toy")), True)
    tokenizer = build.build_tokenizer(config)
    loaders = build.build_data(config, tokenizer, mesh)
    return config, mesh, loaders.train


def _host_batches(loader, weight, count=2):
    pairs = [_with_weights(p, weight) for p in loader.examples[: 4 * count]]
    return [stack_micro_batches([padded_batch(pairs[4 * i: 4 * i + 4], length=64, pad_id=loader.pad_id)],
                                pad_id=loader.pad_id) for i in range(count)]


def _drive(config, mesh, objective, host_batches, workdir, steps):
    """A minimal driver: the builders, then the step runner over our own batches."""
    policy = build.build_policy(config, mesh, objective)
    state, shardings, optimizer, schedule = build.build_state(config, policy.params, mesh, steps)
    train_steps = build.build_steps(config, mesh, objective, policy=policy.graphdef, reference=None,
                                    optimizer=optimizer, schedule=schedule, state_shardings=shardings)
    keys = device_keys(objective, config.reference.mode)
    check_keys(host_batches[0].keys(), device_keys=keys)
    place = BatchPlacer(mesh, 1, keys)
    checkpoints = RunCheckpoints(str(workdir / "checkpoints"), keep=1, async_save=False)
    log = MetricsLog(str(workdir), enabled=True)
    runner = StepRunner(
        train_step=train_steps.train, place=lambda h: place(h, stacked=True), cadence=Cadence(log_every=1),
        mesh=mesh, checkpoints=checkpoints, log=log, progress=Progress(steps, 0, enabled=False),
        trace=StepTrace(str(workdir / "profile"), steps=0, skip=0, enabled=False),
        checkpoint_meta=lambda step: {"step": step},
    )
    losses = []
    with StopSignals() as signals:
        for batch in host_batches[:steps]:
            outcome = runner.run(state, step=int(state.step), end=int(state.step) + 1, total=steps,
                                 batches=iter([batch]), signals=signals)
            state = outcome.state
            losses.append(outcome.train_metrics["loss"])
    checkpoints.close()
    log.close()
    return state, losses, outcome


def test_a_toy_objective_trains_through_the_public_builders(parts, tmp_path):
    config, mesh, loader = parts
    batches = _host_batches(loader, 1.0, count=2)
    state, losses, outcome = _drive(config, mesh, TOY, [batches[0], batches[0], batches[0]], tmp_path, 3)
    assert outcome.status == "finished" and int(state.step) == 3
    assert losses[2] < losses[0]  # it learns
    # Weights of 1 on every completion token: the toy loss is SFT's token-mean NLL, value for value.
    placed = {k: jnp.asarray(v[0]) for k, v in batches[0].items() if k != "example_index"}
    policy = build.build_policy(config, mesh, TOY)
    forward = build.forward_for(config, policy.graphdef, mesh)
    toy_loss, toy_metrics = weighted_nll(forward, policy.params, placed, None)
    sft_loss, _ = sft().loss_fn(forward, policy.params, {k: v for k, v in placed.items() if k != "token_weights"}, None)
    assert float(toy_loss) == pytest.approx(float(sft_loss), rel=1e-6)
    assert float(toy_metrics["toy/weight_sum"]) == float(np.sum(batches[0]["loss_mask"]))
    # And the side array is live: halving the weights halves the loss.
    half = {**placed, "token_weights": placed["token_weights"] * 0.5}
    assert float(weighted_nll(forward, policy.params, half, None)[0]) == pytest.approx(0.5 * float(toy_loss), rel=1e-6)


def test_a_batch_key_nothing_reads_is_an_error_at_build_time(parts):
    config, mesh, loader = parts
    dpo = from_config(config.loss, "none")
    batch = _host_batches(loader, 1.0, count=1)[0]  # carries token_weights, which DPO does not read
    with pytest.raises(ValueError, match=r"hold the key\(s\) \['token_weights'\] that neither the step nor"):
        check_keys(batch.keys(), device_keys=device_keys(dpo, "none"))
    with pytest.raises(ValueError, match=r"lack the key\(s\) \['token_weights'\]"):
        check_keys(loader.batch_at(0, 0).keys(), device_keys=device_keys(TOY, "none"))
    with pytest.raises(build.RunError, match=r"objective 'toy': the training batches lack"):
        build.batch_placer(config, mesh, TOY, loader)
    # The precomputed reference's keys are read only in that mode, and may be added by a lookup.
    keys = device_keys(from_config(config.loss, "precomputed"), "precomputed")
    assert keys[-2:] == ("ref_chosen_logps", "ref_rejected_logps")
    check_keys(loader.batch_at(0, 0).keys(), device_keys=keys, added=keys[-2:])
    with pytest.raises(ValueError, match="step's own"):
        Objective(name="bad", loss_fn=weighted_nll, batch_keys=("loss_mask",))
    with pytest.raises(ValueError, match="unit must be one of"):
        Objective(name="bad", loss_fn=weighted_nll, unit="sequences")
    jax.clear_caches()
