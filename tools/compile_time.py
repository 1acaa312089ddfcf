"""Compile time against depth, with layers unrolled and stacked + scanned (docs/scaling.md).

1. One DPO train step shape (``jaxalign.train``'s step with its frozen reference, the
   quickstart's model width, 16 pairs of 64 tokens, one device): lowering + compilation time
   from abstract shapes (``tools/memory_analysis.analyse``) at each depth.
2. A whole 2-step quickstart (``python -m jaxalign.train --config configs/quickstart.py
   --config.steps=2``, compilation cache off): wall time of the process at each depth, the
   tiny model written beforehand (not timed).

    python tools/compile_time.py --layers 2,8,32
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import jax.numpy as jnp  # noqa: E402

from jaxalign.models.tiny import tiny_config  # noqa: E402
from memory_analysis import analyse  # noqa: E402


def step_compile_seconds(layers: int, scan: bool) -> float:
    """Lowering + compilation of one DPO step of the quickstart-shaped model."""
    config = tiny_config("llama", vocab_size=1024, hidden_size=64, num_layers=layers, num_kv_heads=2,
                         intermediate_size=128, max_position=64).replace(scan_layers=scan, dtype=jnp.float32)
    return analyse(config, {"data": 1}, pairs=16, length=64).compile_seconds


def _quickstart(workdir: Path, layers: int, scan: str, steps: int) -> float:
    cmd = [sys.executable, "-m", "jaxalign.train", "--config", "configs/quickstart.py", "--workdir", str(workdir),
           f"--config.steps={steps}", f"--config.model.path={workdir.parent / f'model-{layers}'}",
           f"--config.model.tiny.num_layers={layers}", f"--config.model.scan_layers={scan}",
           "--config.compilation_cache_dir=none", "--config.checkpoint_every=0"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def quickstart_seconds(root: Path, layers: int) -> tuple[float, float]:
    """Wall times of a 2-step quickstart run, layers unrolled and scanned (the model written
    by an untimed 1-step run first)."""
    _quickstart(root / f"warm-{layers}", layers, "off", steps=1)
    return tuple(_quickstart(root / f"run-{layers}-{scan}", layers, scan, steps=2) for scan in ("off", "on"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,32", help="depths, e.g. 2,8,32")
    parser.add_argument("--no-quickstart", action="store_true", help="only the step compile times")
    args = parser.parse_args()
    depths = [int(x) for x in args.layers.split(",")]
    print("| layers | step compile s, unrolled | step compile s, scanned | quickstart s, unrolled | quickstart s, scanned |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in depths:
            steps = [step_compile_seconds(layers, scan) for scan in (False, True)]
            runs = ["-", "-"] if args.no_quickstart else [f"{s:.1f}" for s in quickstart_seconds(Path(tmp), layers)]
            print(f"| {layers} | {steps[0]:.1f} | {steps[1]:.1f} | {runs[0]} | {runs[1]} |", flush=True)


if __name__ == "__main__":
    main()
