"""Per-device bytes of sharded state, and the compiled memory analysis tool on a tiny Llama."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.parallel import make_mesh, sharded_bytes

TOOL = Path(__file__).resolve().parents[2] / "tools" / "memory_analysis.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("memory_analysis", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_analysis"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_sharded_bytes_counts_shards_and_replicas():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    tree = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "b": jax.ShapeDtypeStruct((32,), jnp.bfloat16)}
    shardings = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P())}
    assert sharded_bytes(tree, shardings) == (64 * 32 * 4 + 32 * 2, 64 * 32 * 4 // 8 + 32 * 2)


@pytest.mark.parametrize(
    "mesh_config, reference",
    [({"fsdp": 8}, "frozen"), ({"fsdp": 4, "tensor": 2}, "precomputed")],
    ids=["fsdp8-frozen", "fsdp4-tensor2-precomputed"],
)
def test_tiny_llama_dpo_step(tool, mesh_config, reference):
    report = tool.analyse(tool.LLAMA_TINY, mesh_config, pairs=8, length=32, chunk_size=16, reference=reference)
    # the trainer's state adds its step counter, RNG key and the two non-finite guard counters
    # (replicated, 4 + 8 + 4 + 4 bytes), and its optax chain one more int32 count
    extra_state, extra_opt = 20, 4
    cfg = tool.LLAMA_TINY
    assert cfg.scan_layers  # stacked [layers, ...] parameters, scanned
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    matrices = v * d * 2 + layers * (4 * d * d + 3 * d * f)  # embed, lm_head, q/k/v/o, gate/up/down
    norms = (2 * layers + 1) * d
    assert report.num_params == matrices + norms
    # fp32 params and two fp32 Adam moments (the count is a replicated int32 scalar)
    assert report.param_bytes_total == 4 * report.num_params
    assert report.opt_bytes_total == 8 * report.num_params + 4 + extra_opt
    # independent expectation: every matrix is split over all 8 devices (fsdp x tensor), norms
    # and the Adam count are replicated
    shards = mesh_config.get("fsdp", 1) * mesh_config.get("tensor", 1)
    assert report.state_bytes_per_device == 12 * (matrices // shards + norms) + 4 + extra_opt
    # ... which is total / (fsdp * tensor) up to the replicated norms: within 2% here
    assert report.ideal_per_device <= report.state_bytes_per_device <= 1.02 * report.ideal_per_device
    # the frozen reference: a second copy of the parameters, sharded like the policy's
    assert report.reference_bytes_per_device == (4 * (matrices // shards + norms) if reference == "frozen" else 0)
    # XLA saw the same sharding: its per-device arguments are the state shards, the reference's
    # and the batch shard (16 rows x 32 tokens: 5 [rows, length] arrays + 1 or 3 [pairs] arrays,
    # 4 bytes each, split over data * fsdp and replicated over tensor)
    pair_arrays = 3 if reference == "precomputed" else 1
    batch_per_device = (5 * 16 * 32 + pair_arrays * 8) * 4 // (mesh_config.get("data", 1) * mesh_config.get("fsdp", 1))
    assert report.argument_bytes == (report.state_bytes_per_device + extra_state + report.reference_bytes_per_device
                                     + batch_per_device)
    # params and optimizer state are donated: updated in place, aliased with the outputs
    assert report.alias_bytes == report.state_bytes_per_device + extra_state
    assert report.temp_bytes > 0
    assert report.collectives["all-gather"] > 0  # FSDP: weights gathered


def test_fit_search_predicts_on_the_line_and_bisects_to_the_largest_batch_that_fits(tool):
    """Peaks of 10 + 3n GiB for the line, of 10 + 3n + n^2/4 GiB compiled: the prediction for a
    40 GiB budget is 10 pairs; the largest that truly fits is 6 (37 GiB; 7 gives 43.25)."""
    gib = tool.GIB

    def report(n: int):
        peak = int((10 + 3 * n + n * n / 4) * gib)
        return tool.MemoryReport(mesh={"data": 1, "fsdp": 8, "tensor": 1}, pairs=8 * n, num_params=0,
                                 param_bytes_total=0, opt_bytes_total=0, param_bytes_per_device=0,
                                 opt_bytes_per_device=0, reference_bytes_per_device=0, argument_bytes=peak,
                                 output_bytes=0, alias_bytes=0, temp_bytes=0, collectives={},
                                 compile_seconds=0.0)

    line = {1: tool.MemoryReport(**{**report(1).__dict__, "argument_bytes": 13 * gib}),
            2: tool.MemoryReport(**{**report(1).__dict__, "argument_bytes": 16 * gib})}
    assert tool.predicted_fit(40 * gib, line[1], line[2]) == 10
    assert tool.predicted_fit(12 * gib, line[1], line[2]) == 0
    measured: list[int] = []

    def measure(n: int):
        measured.append(n)
        return report(n)

    known = {1: report(1), 2: report(2)}
    per_shard, at = tool.verified_fit(measure, 40 * gib, 10, known)
    assert (per_shard, at.peak_bytes) == (6, report(6).peak_bytes)
    assert len(measured) <= 4 and set(measured) <= set(known)  # bisection, every compile kept
