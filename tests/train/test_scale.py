"""The real trainer on different meshes: one device, (data=8), (fsdp=8), (data=2, fsdp=2,
tensor=2), the last with gradient accumulation (2 micro-batches; accumulation on one
device is covered in test_step.py) and with stacked, scanned layers give the same losses
and parameters; a checkpoint
written on 8 devices restores on 4 and 1 with identical arrays and resumes to the same end.

SGD with momentum: the parameters then differ by at most lr times the accumulated gradient
differences (float32 reduction order across devices). Adam would divide near-zero gradient
components by their own tiny second moments and blow that noise up to ~lr per step.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.train.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxalign.train.loop import train
from jaxalign.train.run import prepare

TOL = 1e-5
STEPS = 4
COMMON = {
    "steps": STEPS, "checkpoint_every": 2, "checkpoint.export": True, "data.batch_size": 8, "data.eval_pairs": 0,
    "optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.learning_rate": 0.5,
    "optimizer.schedule": "constant",
}
# name -> (mesh data, fsdp, tensor; micro-batch size: 0 = the whole batch of 8 pairs)
LAYOUTS = {
    "one_device": (1, 1, 1, 0),
    "data8": (8, 1, 1, 0),
    "fsdp8": (1, 8, 1, 0),
    "data2_fsdp2_tensor2": (2, 2, 2, 0),
    "data2_fsdp2_tensor2_accumulate2": (2, 2, 2, 4),
    "data2_fsdp2_tensor2_scanned": (2, 2, 2, 0),  # model.scan_layers=on: stacked layers, scanned
}


def layout_config(make_config, name: str, **extra):
    data, fsdp, tensor, micro = LAYOUTS[name]
    return make_config(**COMMON, **{
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "data.micro_batch_size": micro,
        "model.scan_layers": "on" if name.endswith("_scanned") else "auto", **extra,
    })


def exported(result) -> dict[str, np.ndarray]:
    return load_file(os.path.join(result.export_dir, "model.safetensors"))


def train_losses(metrics_by_step, workdir) -> list[float]:
    m = metrics_by_step(workdir)
    return [m[s]["loss"] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def layout_runs(make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: train(layout_config(make_config, name), root / name) for name in LAYOUTS}


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "one_device"])
def test_layout_gives_the_one_device_losses_and_parameters(name, layout_runs, metrics_by_step, tiny_model_dir):
    reference, run = layout_runs["one_device"], layout_runs[name]
    assert run.step == reference.step == STEPS
    losses, expected = train_losses(metrics_by_step, run.workdir), train_losses(metrics_by_step, reference.workdir)
    np.testing.assert_allclose(losses, expected, rtol=0, atol=TOL)
    assert expected[-1] < expected[0] - 1e-3  # the steps really trained
    a, b = exported(reference), exported(run)
    assert a.keys() == b.keys()
    param_diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print(f"{name}: max |loss diff| {np.max(np.abs(np.subtract(losses, expected))):.2e}, max |param diff| {param_diff:.2e}")
    assert param_diff <= TOL
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max(float(np.max(np.abs(a[k] - initial[k]))) for k in a) > 1e-2  # the parameters moved


def test_eight_device_checkpoint_restores_on_four_and_one_device(layout_runs, make_config, tmp_path):
    source = layout_runs["fsdp8"]
    checkpoints = RunCheckpoints(source.checkpoint_dir)
    arrays = {}
    for name, mesh in {"fsdp8": (1, 8, 1), "fsdp4": (1, 4, 1), "one": (1, 1, 1)}.items():
        config = layout_config(make_config, "fsdp8", **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
        run = prepare(config, str(tmp_path / name))
        state, meta = checkpoints.restore(2, abstract_like(run.state))  # checksums verified on the new layout
        assert meta["step"] == 2 and int(state.step) == 2
        devices = {d for leaf in jax.tree.leaves(state.params) for d in leaf.sharding.device_set}
        assert len(devices) == int(np.prod(mesh))
        arrays[name] = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    checkpoints.close()
    assert arrays["fsdp8"].keys() == arrays["one"].keys() == arrays["fsdp4"].keys()
    for key, value in arrays["fsdp8"].items():
        assert np.array_equal(value, arrays["one"][key]) and np.array_equal(value, arrays["fsdp4"][key]), key


def test_checkpoint_of_unrolled_layers_into_stacked_run_is_a_clear_error(layout_runs, make_config, tmp_path):
    checkpoints = RunCheckpoints(layout_runs["fsdp8"].checkpoint_dir)
    run = prepare(layout_config(make_config, "fsdp8", **{"model.scan_layers": "on"}), str(tmp_path / "stacked"))
    with pytest.raises(CheckpointError, match=r"holds the decoder's layers unrolled but this run builds them "
                                              r"stacked; resume it with --config.model.scan_layers=off"):
        checkpoints.restore(2, abstract_like(run.state))
    checkpoints.close()


def test_eight_device_run_resumed_on_one_device_reaches_the_same_end(layout_runs, make_config, tmp_path):
    source = layout_runs["fsdp8"]
    workdir = tmp_path / "resumed"
    shutil.copytree(source.workdir, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if the 8-device job had stopped at step 2
    shutil.rmtree(workdir / "export")
    resumed = train(layout_config(make_config, "one_device"), workdir)
    assert resumed.resumed_from == 2 and resumed.step == STEPS
    a, b = exported(layout_runs["one_device"]), exported(resumed)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= TOL


def test_packed_rows_split_over_the_batch_axes(make_config, metrics_by_step, tmp_path):
    # The loader rounds its packed rows up to a multiple of the mesh's batch devices (data*fsdp),
    # so packed training runs on any mesh; two meshes with the same data*fsdp see the same batches.
    runs = {}
    for name, (data, fsdp, tensor) in {"data2_fsdp2_tensor2": (2, 2, 2), "data4_tensor2": (4, 1, 2)}.items():
        config = make_config(**{**COMMON, "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                                "data.packing": True, "checkpoint.export": False})
        runs[name] = train(config, tmp_path / name)
        assert runs[name].step == STEPS
    a, b = (train_losses(metrics_by_step, r.workdir) for r in runs.values())
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
    assert a[-1] < a[0] - 1e-3
