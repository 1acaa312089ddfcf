"""tools/bench_lora.py measures every side on a tiny model: LoRA's step holds less memory than full
fine-tuning, and its base in bfloat16 makes the state the step takes smaller again."""

from __future__ import annotations

import importlib.util
import os

from jaxalign.models.tiny import write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lora_step_holds_less_memory_than_full_fine_tuning(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lora", os.path.join(ROOT, "tools", "bench_lora.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_tiny_checkpoint(tmp_path / "model", hidden_size=64, intermediate_size=128, num_layers=2, num_kv_heads=2,
                          max_position=128)
    full = bench.measure(str(tmp_path / "model"), 0, steps=1)
    lora = bench.measure(str(tmp_path / "model"), 4, steps=1)
    half = bench.measure(str(tmp_path / "model"), 4, steps=1, base_dtype="bfloat16")
    assert full["step_s"] > 0 and lora["step_s"] > 0 and half["step_s"] > 0
    assert lora["step_memory_mib"] < full["step_memory_mib"]
    assert half["argument_mib"] < lora["argument_mib"]
