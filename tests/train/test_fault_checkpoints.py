"""Checkpoint damage on resume: every kind of broken newest checkpoint is reported with its
step and reason and the previous one is used; all broken is an error; checksums."""

from __future__ import annotations

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from jaxalign import parallel
from jaxalign.train.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    UnusableCheckpoint,
    UnusableCheckpointWarning,
    abstract_like,
    state_checksums,
)
from jaxalign.train.loop import RunError, train


def _state(seed: int, mesh) -> dict:
    """A small state: a matrix split over 8 devices, a replicated vector, an int counter, a bf16 array."""
    rng = np.random.default_rng(seed)
    split = NamedSharding(mesh, PartitionSpec("fsdp"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        "w": jax.device_put(rng.normal(size=(64, 256)).astype(np.float32), split),
        "b": jax.device_put(rng.normal(size=(256,)).astype(np.float32), replicated),
        "count": jax.device_put(np.int32(seed), replicated),
        "h": jax.device_put(jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16), replicated),
    }


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"fsdp": 8})


def _largest_data_file(step_dir) -> str:
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    f = _largest_data_file(step_dir)
    os.truncate(f, os.path.getsize(f) // 2)


def _overwrite_middle(step_dir):
    f = _largest_data_file(step_dir)
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        data = fh.read(16)
        fh.seek(os.path.getsize(f) // 2)
        fh.write(bytes(b ^ 0xFF for b in data))


DAMAGE = {
    "truncated array data": (_truncate, "reading it failed"),
    "deleted array data": (lambda d: os.remove(_largest_data_file(d)), "reading it failed"),
    "overwritten array data": (_overwrite_middle, "differ from their saved checksum"),
    "missing commit marker": (lambda d: os.remove(os.path.join(d, "commit_success.txt")), "commit marker commit_success.txt is missing"),
    "unreadable checkpoint metadata": (
        lambda d: open(os.path.join(d, "_CHECKPOINT_METADATA"), "w").write("{garbage"), "_CHECKPOINT_METADATA is unreadable"),
    "unreadable state metadata": (
        lambda d: open(os.path.join(d, "state", "_METADATA"), "w").write(""), "state/_METADATA is unreadable"),
    "deleted meta item": (lambda d: shutil.rmtree(os.path.join(d, "meta")), "file meta/metadata is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, mesh, tmp_path):
    directory = tmp_path / "checkpoints"
    saved = RunCheckpoints(directory, async_save=True)
    for step in (1, 2):
        saved.save(step, _state(step, mesh), {"step": step, "loader": {"batch": step}})
    saved.close()
    damage_fn, reason = DAMAGE[damage]
    damage_fn(str(directory / "2"))

    checkpoints = RunCheckpoints(directory)
    target = abstract_like(_state(0, mesh))
    with pytest.warns(UnusableCheckpointWarning, match=rf"checkpoint at step 2 \(.*\) is unusable: .*{reason}"):
        restored = checkpoints.restore_latest(target)
    assert restored.step == 1 and restored.meta == {"step": 1, "loader": {"batch": 1}}
    expected = _state(1, mesh)
    for key in expected:
        assert np.array_equal(np.asarray(restored.state[key]), np.asarray(expected[key])), key
    assert restored.state["w"].sharding == expected["w"].sharding
    # the unusable step is set aside (kept for inspection), so the run can save step 2 again
    assert sorted(os.listdir(directory)) == ["1", "2.unusable"] and checkpoints.all_steps() == [1]
    checkpoints.save(2, _state(2, mesh), {"step": 2})
    checkpoints.close()
    assert RunCheckpoints(directory).restore_latest(target).step == 2


def test_a_partial_restore_reads_and_checks_only_its_part(mesh, tmp_path):
    """The sampler's read: one array of the state, checked against its saved checksum; a damaged
    newest step is skipped and, for a reader, left where it is."""
    directory = tmp_path / "checkpoints"
    saved = RunCheckpoints(directory, async_save=False)
    for step in (1, 2):
        saved.save(step, _state(step, mesh), {"step": step})
    saved.close()
    _overwrite_middle(str(directory / "2"))  # the largest array: "w"
    checkpoints = RunCheckpoints(directory)
    target = {"w": abstract_like(_state(0, mesh))["w"]}
    with pytest.raises(UnusableCheckpoint, match="differ from their saved checksum"):
        checkpoints.restore(2, target, partial=True)
    with pytest.warns(UnusableCheckpointWarning, match=r"step 2 .* differ from their saved checksum"):
        restored = checkpoints.restore_latest(target, partial=True, set_aside=False)
    assert restored.step == 1 and list(restored.state) == ["w"]
    assert np.array_equal(np.asarray(restored.state["w"]), np.asarray(_state(1, mesh)["w"]))
    assert restored.state["w"].sharding == _state(1, mesh)["w"].sharding
    assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing set aside
    b_only = checkpoints.restore(2, {"b": abstract_like(_state(0, mesh))["b"]}, partial=True)[0]
    assert np.array_equal(np.asarray(b_only["b"]), np.asarray(_state(2, mesh)["b"]))  # the intact part reads
    checkpoints.close()


def test_all_checkpoints_unusable_is_an_error_and_nothing_is_moved(mesh, tmp_path):
    directory = tmp_path / "checkpoints"
    saved = RunCheckpoints(directory, async_save=False)
    for step in (1, 2):
        saved.save(step, _state(step, mesh), {"step": step})
    saved.close()
    _truncate(str(directory / "2"))
    os.remove(directory / "1" / "commit_success.txt")
    with pytest.warns(UnusableCheckpointWarning), pytest.raises(CheckpointError) as error:
        RunCheckpoints(directory).restore_latest(abstract_like(_state(0, mesh)))
    message = str(error.value)
    assert "holds 2 checkpoint(s) and none can be restored" in message
    assert "step 2: reading it failed" in message and "step 1: commit marker commit_success.txt is missing" in message
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_an_interrupted_save_is_reported_and_ignored(mesh, tmp_path):
    directory = tmp_path / "checkpoints"
    saved = RunCheckpoints(directory, async_save=False)
    saved.save(1, _state(1, mesh), {"step": 1})
    saved.close()
    # what a kill during the save of step 2 leaves: a temporary directory, never renamed
    shutil.copytree(directory / "1", directory / "2.orbax-checkpoint-tmp")
    os.remove(directory / "2.orbax-checkpoint-tmp" / "commit_success.txt")
    checkpoints = RunCheckpoints(directory)
    with pytest.warns(UnusableCheckpointWarning, match="2.orbax-checkpoint-tmp: an interrupted checkpoint save"):
        assert checkpoints.restore_latest(abstract_like(_state(0, mesh))).step == 1
    checkpoints.save(2, _state(2, mesh), {"step": 2})  # Orbax replaces the stale temporary directory
    checkpoints.close()
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_checksums_do_not_depend_on_the_mesh(mesh):
    state = _state(3, mesh)
    on_one_device = jax.device_put(jax.tree.map(np.asarray, state), jax.devices()[0])
    assert state_checksums(state) == state_checksums(on_one_device)
    changed = dict(on_one_device, w=on_one_device["w"].at[63, 255].add(1e-6))
    sums = state_checksums(changed)
    assert sums["['w']"] != state_checksums(state)["['w']"] and sums["['b']"] == state_checksums(state)["['b']"]


def test_run_resumes_from_the_previous_checkpoint_when_the_latest_is_truncated(make_config, tmp_path):
    config = make_config(**{"steps": 4, "checkpoint_every": 1, "checkpoint.export": True})
    full = train(config, tmp_path / "full")
    part = train(config, tmp_path / "part", stop_at_step=3)
    assert part.status == "stopped"
    _truncate(str(tmp_path / "part" / "checkpoints" / "3"))
    with pytest.warns(UnusableCheckpointWarning, match=r"checkpoint at step 3 .* is unusable: reading it failed"):
        resumed = train(config, tmp_path / "part")
    assert resumed.resumed_from == 2 and resumed.step == 4 and resumed.status == "finished"
    a = load_file(os.path.join(full.export_dir, "model.safetensors"))
    b = load_file(os.path.join(resumed.export_dir, "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same program, same data order: bit-exact
    # every checkpoint broken: a clear error, never a silent fresh start
    for step in (2, 3, 4):
        os.remove(tmp_path / "part" / "checkpoints" / str(step) / "commit_success.txt")
    with pytest.warns(UnusableCheckpointWarning), pytest.raises(RunError, match="none can be restored"):
        train(config, tmp_path / "part")
