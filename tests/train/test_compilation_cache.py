"""The persistent compilation cache: where ``compilation_cache_dir`` puts it, and that a resumed
run (or another run naming the same directory) loads compiled programs from it."""

from __future__ import annotations

import os

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from jaxalign.train.cli import main
from jaxalign.runtime.compilation_cache import CACHE_SUBDIR, resolve_cache_dir
from jaxalign.train.config import ConfigError
from jaxalign.train.loop import RunError, train

HIT = "/jax/compilation_cache/cache_hits"


@pytest.fixture
def cache_hits():
    """A list that gets one entry per persistent-cache hit while the test runs."""
    hits: list[str] = []

    def listener(event: str, **_: object) -> None:
        if event == HIT:
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    yield hits
    jax.monitoring.unregister_event_listener(listener)


@pytest.fixture
def without_jax_setting():
    """JAX's own cache directory unset for the test (these tests' shared one restored after)."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", previous)
    jax_cache.reset_cache()


def test_the_setting_names_the_directory(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    assert resolve_cache_dir("", workdir) == os.path.join(workdir, CACHE_SUBDIR)
    assert resolve_cache_dir("", workdir, "/jax/own") == "/jax/own"
    assert resolve_cache_dir("none", workdir, "/jax/own") is None
    assert resolve_cache_dir("/shared/xla", workdir, "/jax/own") == "/shared/xla"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir("~/xla", workdir) == str(tmp_path / "home" / "xla")
    monkeypatch.chdir(tmp_path)
    assert resolve_cache_dir("relative", workdir) == str(tmp_path / "relative")


def test_a_resumed_run_loads_its_compiled_programs_from_the_workdir(
        make_config, tmp_path, cache_hits, without_jax_setting):
    config = make_config(steps=3)
    assert train(config, tmp_path, stop_at_step=1).step == 1
    assert jax.config.jax_compilation_cache_dir is None  # JAX's setting is back after the run
    assert os.listdir(tmp_path / CACHE_SUBDIR)  # the tests compile with min_compile_time 0: all written
    assert cache_hits == []  # a new directory: nothing to load
    resumed = train(config, tmp_path)
    assert resumed.resumed_from == 1 and resumed.step == 3
    assert cache_hits  # the step, the eval step and the state's initialisation came from disk


def test_runs_naming_one_directory_share_it_and_none_turns_it_off(make_config, tmp_path, cache_hits):
    shared = tmp_path / "xla"
    train(make_config(steps=1, compilation_cache_dir=str(shared)), tmp_path / "a")
    assert os.listdir(shared) and not (tmp_path / "a" / CACHE_SUBDIR).exists()
    assert cache_hits == []
    train(make_config(steps=1, compilation_cache_dir=str(shared)), tmp_path / "b")
    loaded = len(cache_hits)
    assert loaded > 0

    previous = jax.config.jax_compilation_cache_dir
    train(make_config(steps=1, compilation_cache_dir="none"), tmp_path / "c")
    assert len(cache_hits) == loaded and not (tmp_path / "c" / CACHE_SUBDIR).exists()
    assert jax.config.jax_compilation_cache_dir == previous


def test_a_damaged_cache_entry_is_compiled_again(make_config, tmp_path, without_jax_setting):
    """A kill -9 during a cache write leaves a truncated entry: the resumed run warns, compiles
    that program again and trains on, with the numbers of an undamaged resume."""
    config = make_config(steps=3)
    train(config, tmp_path / "damaged", stop_at_step=1)
    train(config, tmp_path / "intact", stop_at_step=1)
    entries = [e for e in os.scandir(tmp_path / "damaged" / CACHE_SUBDIR) if e.is_file()]
    assert entries
    for entry in entries:
        with open(entry.path, "r+b") as f:
            f.truncate(entry.stat().st_size // 2)
    with pytest.warns(UserWarning, match="persistent compilation cache"):
        damaged = train(config, tmp_path / "damaged")
    intact = train(config, tmp_path / "intact")
    assert damaged.step == intact.step == 3
    assert damaged.train_metrics["loss"] == intact.train_metrics["loss"]


def test_directories_that_cannot_be_created_are_named(make_config, tmp_path, recipe_file, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    previous = jax.config.jax_compilation_cache_dir
    with pytest.raises(ConfigError, match=r"compilation_cache_dir: cannot create .*a-file/xla"):
        train(make_config(compilation_cache_dir=str(blocker / "xla")), tmp_path / "run")
    assert jax.config.jax_compilation_cache_dir == previous
    with pytest.raises(RunError, match=r"cannot create the run directory .*a-file/run"):
        train(make_config(), blocker / "run")
    # through the command line: exit code 2 and the message, no traceback
    recipe = recipe_file(make_config(compilation_cache_dir=str(blocker / "xla")), tmp_path / "recipe.py")
    assert main(["jaxalign.train", "--config", recipe, "--workdir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "error: compilation_cache_dir: cannot create" in err and "Traceback" not in err
