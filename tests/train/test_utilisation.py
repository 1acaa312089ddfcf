"""The logged model FLOP/s, MFU and peak memory: the FLOP count per token, the peak, the memory
source, and the run's metrics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from jaxalign.models.tiny import tiny_config
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics
from jaxalign.train.run import prepare
from jaxalign.perf.utilisation import flop_rates, flops_per_token, peak_flops, peak_memory

# hidden 8, 2 layers, 2 heads of 4, 1 kv head, MLP 16, vocab 32: N = 1192 (blocks + final norm)
# + 256 (unembedding) = 1448, hand-counted in tests/bench/test_flops.py.
POLICY = tiny_config("llama", vocab_size=32, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=16)
# The same with one layer: N = 592 + 8 + 256 = 856.
REFERENCE = tiny_config("llama", vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=16)


def test_flops_per_token_count_the_policy_and_a_reference_in_the_step():
    assert flops_per_token(POLICY) == 6 * 1448
    assert flops_per_token(POLICY, POLICY) == 8 * 1448
    assert flops_per_token(POLICY, REFERENCE) == 6 * 1448 + 2 * 856


def test_peak_is_the_setting_or_the_data_sheet_per_device():
    h100 = [SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")] * 8
    cpu = [SimpleNamespace(device_kind="cpu")] * 2
    assert peak_flops(0.0, h100, "bfloat16") == pytest.approx(8 * 989.4e12)
    assert peak_flops(0.0, h100, "float32") == pytest.approx(8 * 494.7e12)  # TF32, JAX's default on GPUs
    assert peak_flops(0.0, cpu, "bfloat16") is None
    assert peak_flops(3e11, cpu, "float32") == pytest.approx(6e11)
    assert peak_flops(1e12, h100, "bfloat16") == pytest.approx(8e12)


def test_flop_rates():
    assert flop_rates(100.0, 6 * 1448, None) == {"model_flops_per_second": 100.0 * 6 * 1448}
    rates = flop_rates(100.0, 6 * 1448, 1e7)
    assert rates["mfu"] == pytest.approx(100.0 * 6 * 1448 / 1e7)


def test_peak_memory_is_the_largest_device_peak_else_the_host_peak():
    def device(stats):
        return SimpleNamespace(memory_stats=lambda: stats)

    gpus = [device({"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 2**30}), device({"peak_bytes_in_use": 5 * 2**30})]
    assert peak_memory(gpus) == {"peak_device_memory_gib": 5.0}
    host = peak_memory([device(None)])  # XLA:CPU keeps no statistics
    assert host.keys() == {"peak_host_memory_gib"} and 0.05 < host["peak_host_memory_gib"] < 64
    assert peak_memory([device({"bytes_in_use": 1})]).keys() == {"peak_host_memory_gib"}


def test_the_run_counts_the_reference_only_when_it_runs_in_the_step(make_config, tmp_path):
    for mode, in_step in (("frozen", True), ("precomputed", False), ("none", False)):
        run = prepare(make_config(**{"reference.mode": mode}), str(tmp_path / mode))
        policy = nnx.merge(run.graphdef, run.state.params["model"]).config
        assert run.flops_per_token == flops_per_token(policy, policy if in_step else None), mode
        assert run.peak_flops is None  # a CPU: no data-sheet peak


def test_a_run_logs_its_model_flops_and_mfu(make_config, tmp_path):
    run = prepare(make_config(), str(tmp_path / "probe"))
    train(make_config(peak_flops_per_device=1e9), tmp_path / "run")
    logged = [e for e in read_metrics(tmp_path / "run") if "tokens_per_second" in e]
    assert [e["step"] for e in logged] == [1, 2]
    for e in logged:
        assert e["model_flops_per_second"] == pytest.approx(e["tokens_per_second"] * run.flops_per_token, rel=1e-9)
        assert e["mfu"] == pytest.approx(e["model_flops_per_second"] / 1e9, rel=1e-9)  # one device
        assert e["peak_host_memory_gib"] > 0.05  # a CPU: the process's peak resident set

    train(make_config(steps=1), tmp_path / "cpu")  # no peak known for a CPU: no mfu
    (entry,) = [e for e in read_metrics(tmp_path / "cpu") if "tokens_per_second" in e]
    assert entry["model_flops_per_second"] > 0 and "mfu" not in entry


@pytest.mark.parametrize("packing", [False, True])
def test_the_logged_real_token_fraction_is_the_share_of_real_tokens_in_the_batches(make_config, tmp_path, packing):
    config = make_config(steps=2, **{"data.packing": packing})
    run = prepare(config, str(tmp_path / "probe"))
    expected = [float(np.mean(next(run.train_loader)["segment_ids"] > 0)) for _ in range(2)]
    assert 0.1 < min(expected) and max(expected) < 1  # the batches have padding: the check is not trivial
    train(config, tmp_path / "run")
    logged = [e["real_token_fraction"] for e in read_metrics(tmp_path / "run") if "real_token_fraction" in e]
    assert logged == pytest.approx(expected, rel=1e-12)
