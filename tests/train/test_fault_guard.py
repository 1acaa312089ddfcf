"""The non-finite guard: an injected NaN gradient is skipped inside the step and counted; the
run goes on; N consecutive ones stop it with a checkpoint of the last good state (exit 3)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxalign.train.cli import EXIT_NONFINITE, main
from jaxalign.train.loop import train

# Both tests run the same compiled step: NaN gradients at step 2, then from step 5 on.
GUARD = {
    "checkpoint_every": 1, "checkpoint.keep": 10, "optimizer.warmup_steps": 3,
    "optimizer.schedule": "constant", "progress_bar": False, "max_consecutive_nonfinite": 2,
    "debug.nan_at_steps": (2, *range(5, 21)),
}


def _params_and_opt(arrays: dict) -> dict:
    return {k: v for k, v in arrays.items() if k.startswith(("['params']", "['opt_state']"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_nan_gradient_is_skipped_counted_and_training_goes_on(make_config, tmp_path, metrics_by_step, checkpoint_arrays):
    config = make_config(**GUARD, steps=4)
    result = train(config, tmp_path / "run")
    assert result.status == "finished" and result.step == 4
    m = metrics_by_step(tmp_path / "run")
    assert [m[s]["finite"] for s in (1, 2, 3, 4)] == [1.0, 0.0, 1.0, 1.0]
    assert [m[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert [m[s]["consecutive_nonfinite"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 0.0]
    assert m[2]["grad_norm"] == "nan" and all(np.isfinite(m[s]["loss"]) for s in (1, 3, 4))
    # the skipped step did not advance the optimizer: step 3 runs at step 2's warmup learning rate
    assert m[3]["learning_rate"] == pytest.approx(m[2]["learning_rate"]) and m[2]["learning_rate"] > m[1]["learning_rate"]

    ckpt = result.checkpoint_dir
    after = {s: checkpoint_arrays(ckpt, s) for s in (1, 2, 3)}
    # step 2 changed nothing but the counters (bit for bit: params, Adam moments and count) ...
    assert _same(_params_and_opt(after[1]), _params_and_opt(after[2]))
    assert (after[1]["['step']"], after[2]["['step']"]) == (1, 2)
    assert (after[2]["['nonfinite_steps']"], after[2]["['consecutive_nonfinite']"]) == (1, 1)
    assert not np.array_equal(after[1]["['rng']"], after[2]["['rng']"])  # the batch and its randomness were consumed
    # ... and training went on: step 3 updated the parameters again, all finite
    moved = [k for k in _params_and_opt(after[3]) if not np.array_equal(after[3][k], after[2][k])]
    assert any("['params']" in k for k in moved)
    assert all(np.all(np.isfinite(v)) for v in after[3].values() if v.dtype.kind == "f")


def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_state(
    make_config, tmp_path, recipe_file, capsys, checkpoint_arrays, metrics_by_step
):
    recipe = recipe_file(make_config(**GUARD, steps=20), tmp_path / "recipe.py")
    workdir = tmp_path / "run"
    assert main(["jaxalign.train", "--config", recipe, "--workdir", str(workdir)]) == EXIT_NONFINITE
    err = capsys.readouterr().err
    # steps 5 and 6 were bad; the loop learns of the second one a step later, so step 7 (a no-op) is the last
    assert "2 consecutive steps (5..6) had a non-finite loss or gradients" in err
    assert "checkpoint at step 7" in err and "parameters of step 4, the last good one" in err
    checkpoints = workdir / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == list(range(1, 8))
    last_good, stopped = checkpoint_arrays(checkpoints, 4), checkpoint_arrays(checkpoints, 7)
    assert _same(_params_and_opt(last_good), _params_and_opt(stopped))
    assert (stopped["['step']"], stopped["['nonfinite_steps']"], stopped["['consecutive_nonfinite']"]) == (7, 3, 2)
    m = metrics_by_step(workdir)
    assert max(m) == 7 and m[7]["consecutive_nonfinite"] == 2.0 and m[7]["nonfinite_steps"] == 3.0

    # resuming restarts the consecutive count (the NaNs go on here: two more bad steps, then a stop at 10)
    assert main(["jaxalign.train", "--config", recipe, "--workdir", str(workdir)]) == EXIT_NONFINITE
    captured = capsys.readouterr()
    assert "the checkpoint at step 7 ended 2 consecutive non-finite steps; the count restarts at 0" in captured.out
    assert "2 consecutive steps (8..9) had a non-finite loss" in captured.err
    resumed = checkpoint_arrays(checkpoints, 10)
    assert _same(_params_and_opt(last_good), _params_and_opt(resumed))
    assert (resumed["['nonfinite_steps']"], resumed["['consecutive_nonfinite']"]) == (5, 2)
