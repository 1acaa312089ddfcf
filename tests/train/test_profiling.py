"""The ``profile`` config: a jax.profiler trace of a window of steps in WORKDIR/profile."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest

from jaxalign.train.config import ConfigError, validate
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics


def traced_steps(workdir) -> list[int]:
    """The ``step_num`` of every ``train`` step annotation in the run's XProf trace(s)."""
    files = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(files) == 1, files
    steps = []
    for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
        for line in plane.lines:
            steps += [dict(e.stats)["step_num"] for e in line.events if e.name == "train"]
    return sorted(steps)


def test_the_window_of_steps_is_traced_and_training_is_unchanged(make_config, tmp_path, capsys):
    config = make_config(steps=5, **{"profile.steps": 2, "profile.skip_steps": 1})
    traced = train(config, tmp_path / "traced")
    assert traced_steps(tmp_path / "traced") == [2, 3]
    assert glob.glob(str(tmp_path / "traced" / "profile" / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
    assert "profile: steps 2..3 traced to" in capsys.readouterr().out
    plain = train(make_config(steps=5), tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / "profile")
    losses = [[m["loss"] for m in read_metrics(r.metrics_file) if "loss" in m] for r in (traced, plain)]
    np.testing.assert_array_equal(losses[0], losses[1])


def test_a_run_that_ends_inside_the_window_still_writes_its_trace(make_config, tmp_path):
    config = make_config(steps=3, **{"profile.steps": 5, "profile.skip_steps": 1})
    assert train(config, tmp_path).step == 3
    assert traced_steps(tmp_path) == [2, 3]


def test_the_window_counts_the_steps_of_this_process_after_a_resume(make_config, tmp_path):
    train(make_config(steps=4), tmp_path, stop_at_step=2)
    train(make_config(steps=4, **{"profile.steps": 1, "profile.skip_steps": 1}), tmp_path)
    assert traced_steps(tmp_path) == [4]


def test_a_profiler_that_cannot_start_is_a_warning(make_config, tmp_path, capsys):
    jax.profiler.start_trace(str(tmp_path / "outer"))  # only one trace may run at a time
    try:
        result = train(make_config(steps=2, **{"profile.steps": 1, "profile.skip_steps": 0}), tmp_path / "run")
    finally:
        jax.profiler.stop_trace()
    assert result.step == 2
    assert "warning: profile: the trace did not start" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["profile.steps", "profile.skip_steps"])
def test_negative_profile_settings_are_refused(make_config, key):
    with pytest.raises(ConfigError, match=f"'{key}' must be >= 0"):
        validate(make_config(**{key: -1}))
