"""LoRA against full fine-tuning: the DPO train step's compiled memory and its time, side by side.

Builds the offline trainer's run (``jaxalign.train.run.prepare``) twice on the same model and
data, full fine-tuning with a frozen reference in the step and LoRA (adapters on the attention
projections; the reference is the base with adapters off), and reports for each the step's
memory from XLA's ``compiled.memory_analysis()`` (arguments + outputs + temporaries - aliased
donations: what one step holds at its peak, on any backend) and the median step time over
interleaved repeats. Results go to docs/performance.md.

    python tools/make_tiny_model.py runs/bench-lora-model --hidden 512 --layers 8 --heads 8 --max-position 512
    python tools/bench_lora.py runs/bench-lora-model [--rank 8] [--steps 6]

A third side keeps LoRA's frozen base in bfloat16 (``lora.base_dtype``) and computes in bfloat16
(``model.dtype``), as a run that stores its base in bfloat16 would. ``--scan-layers`` picks the
layer layout (``model.scan_layers``; the default, ``auto``, scans these 8 layers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax

from jaxalign.data.batching import stack_micro_batches
from jaxalign.train.config import base_config
from jaxalign.train.run import prepare


def config(model: str, rank: int, base_dtype: str = "", scan_layers: str = "auto"):
    c = base_config()
    c.model.path, c.data.train, c.data.synthetic_pairs = model, "synthetic", 256
    c.data.max_length, c.data.max_prompt_length, c.data.buckets = 128, 64, (128,)
    c.data.batch_size, c.data.eval_pairs, c.progress_bar = 8, 0, False
    c.reference.mode, c.lora.rank, c.lora.base_dtype = "frozen", rank, base_dtype
    c.model.dtype, c.model.scan_layers = base_dtype or "float32", scan_layers
    return c


def measure(model: str, rank: int, steps: int, base_dtype: str = "", scan_layers: str = "auto") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        run = prepare(config(model, rank, base_dtype, scan_layers), workdir)
        batch = run.place_train(stack_micro_batches([next(run.train_loader)], pad_id=run.train_loader.pad_id),
                                stacked=True)
        compiled = run.train_step.lower(run.state, batch, run.reference_params).compile()
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        state, times = run.state, []
        for _ in range(steps + 1):
            start = time.perf_counter()
            state, metrics = run.train_step(state, batch, run.reference_params)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
        return {"step_memory_mib": peak / 2**20, "argument_mib": m.argument_size_in_bytes / 2**20,
                "step_s": statistics.median(times[1:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--scan-layers", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    sides = {"full": (0, ""), "lora": (args.rank, ""), "lora, bfloat16": (args.rank, "bfloat16")}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, (rank, base_dtype) in sides.items():
            results[name].append(measure(args.model, rank, args.steps, base_dtype, args.scan_layers))
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    full = rows["full"]
    for name, row in rows.items():
        print(f"{name:14s} step memory {row['step_memory_mib']:8.1f} MiB  (arguments {row['argument_mib']:7.1f} MiB)  step {row['step_s'] * 1000:7.1f} ms  "
              f"(/ full: memory {row['step_memory_mib'] / full['step_memory_mib']:.2f}x, "
              f"step time {row['step_s'] / full['step_s']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
