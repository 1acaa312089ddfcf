"""Compiled memory analysis of jaxalign's DPO train step on fake CPU meshes (nothing is allocated).

The step is ``jaxalign.train``'s real one (``make_train_step``, default config: DPO, AdamW,
one gradient-accumulation micro-batch, log-probs in chunks from the final hidden states),
with the frozen reference's forward in the step (``--reference frozen``, default: a second
copy of the parameters, sharded like the policy's) or precomputed reference log-probs. It is
lowered under the mesh (as the trainer runs it: the models' activation constraints apply) and
compiled ahead of time from abstract shapes (``jax.ShapeDtypeStruct`` with shardings from
``jaxalign.parallel``). Models: ``jaxalign.models``' Llama built abstractly, layers stacked
and scanned (``--scan-layers off``: unrolled), float32 parameters and Adam moments, bfloat16
compute, ``remat="full"``.

For every mesh it reports, per device: parameter and optimizer bytes from the shardings
(compared with ``total / (fsdp * tensor)``), XLA's ``compiled.memory_analysis()``
(arguments, outputs, temporaries; donated inputs alias the outputs), the collectives in the
compiled HLO, and the compile time. ``--fit 16,80,95`` also finds, per budget in GiB, the
largest number of pairs per ``data x fsdp`` shard whose arguments + temporaries fit: on the
line through the compiled sizes at 1 and 2 pairs per shard; with ``--verify`` the prediction
is compiled (and lowered by one until it fits).

    python tools/memory_analysis.py --devices 8 --model 8b --mesh fsdp=8 --mesh fsdp=4,tensor=2
    python tools/memory_analysis.py --devices 64 --model 8b --mesh fsdp=64 --fit 16,80,95 --verify --json
    python tools/memory_analysis.py --table --model 8b   # 8, 64 and 256 devices, one subprocess each

``--devices N`` fakes N CPU devices (``XLA_FLAGS``), so it must be set before JAX starts: the
``--table`` mode runs one subprocess per device count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # fake devices must be configured before jax is imported
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--devices", type=int, default=0)
    _count = _pre.parse_known_args()[0].devices
    if _count:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_count}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxalign import parallel  # noqa: E402
from jaxalign.models import ModelConfig, abstract_model  # noqa: E402

GIB = 2**30

# Meta Llama-3-8B's shapes (HF config): 8.03e9 parameters.
LLAMA3_8B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, intermediate_size=14336, max_position=8192, norm_eps=1e-5, rope_theta=500000.0,
    dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full", scan_layers=True,
)
# Llama-3-70B's shapes: 70.6e9 parameters.
LLAMA3_70B = dataclasses.replace(
    LLAMA3_8B, hidden_size=8192, num_layers=80, num_heads=64, intermediate_size=28672,
    rope_scaling=None,
)
# A small model with the same structure, for the test suite.
LLAMA_TINY = dataclasses.replace(
    LLAMA3_8B, vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
    intermediate_size=256, max_position=128,
)
MODELS = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "tiny": LLAMA_TINY}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled step on one mesh."""

    mesh: dict[str, int]
    pairs: int
    num_params: int
    param_bytes_total: int
    opt_bytes_total: int
    param_bytes_per_device: int
    opt_bytes_per_device: int
    reference_bytes_per_device: int  # the frozen reference's parameters (0 when precomputed)
    argument_bytes: int  # compiled.memory_analysis(): per device
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    collectives: dict[str, int]  # op -> count in the compiled HLO (a scanned body's ops count once)
    compile_seconds: float

    @property
    def state_bytes_total(self) -> int:
        return self.param_bytes_total + self.opt_bytes_total

    @property
    def state_bytes_per_device(self) -> int:
        return self.param_bytes_per_device + self.opt_bytes_per_device

    @property
    def ideal_per_device(self) -> float:
        """``total / (fsdp * tensor)``: what perfect sharding of params + optimizer would give."""
        return self.state_bytes_total / (self.mesh["fsdp"] * self.mesh["tensor"])

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries: what a device must hold (outputs alias the donated state)."""
        return self.argument_bytes + self.temp_bytes


def abstract_batch(pairs: int, length: int, mesh, *, precomputed: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one micro-batch of an unpacked preference batch (docs/architecture.md): ``[1,
    2 * pairs, length]`` rows (the step's accumulation axis first), rows over ``data x fsdp``."""
    rows = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    spec = {
        "input_ids": ((2 * pairs, length), jnp.int32),
        "positions": ((2 * pairs, length), jnp.int32),
        "segment_ids": ((2 * pairs, length), jnp.int32),
        "loss_mask": ((2 * pairs, length), jnp.float32),
        "sequence_ids": ((2 * pairs, length), jnp.int32),
        "pair_mask": ((pairs,), jnp.float32),
    }
    if precomputed:
        spec.update(ref_chosen_logps=((pairs,), jnp.float32), ref_rejected_logps=((pairs,), jnp.float32))
    return {k: jax.ShapeDtypeStruct((1, *shape), dtype, sharding=rows) for k, (shape, dtype) in spec.items()}


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def collective_counts(hlo: str) -> dict[str, int]:
    """How many of each collective op the compiled HLO text holds (async pairs count once)."""
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def analyse(model_config: ModelConfig, mesh_config: dict[str, int], *, pairs: int, length: int,
            chunk_size: int = 128, reference: str = "frozen", devices=None) -> MemoryReport:
    """Lowers (under the mesh) and compiles the trainer's DPO step for ``mesh_config`` from
    abstract shapes; reports per-device bytes. ``reference``: ``frozen`` (its forward in the
    step) or ``precomputed`` (log-probs in the batch)."""
    from jaxalign.objectives import from_config
    from jaxalign.scoring.forward import Forward
    from jaxalign.train.config import base_config
    from jaxalign.train.optimizer import make_optimizer
    from jaxalign.train.state import init_state
    from jaxalign.train.step import make_train_step

    if reference not in ("frozen", "precomputed"):
        raise ValueError(f"reference must be 'frozen' or 'precomputed', got {reference!r}")
    mesh = parallel.make_mesh(mesh_config, devices=devices)
    graphdef, params = nnx.split(abstract_model(model_config), nnx.Param)
    config = base_config()
    optimizer, schedule = make_optimizer(config.optimizer, 1000)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), {"model": params})
    state_sh = parallel.param_shardings(state, mesh)
    batch = abstract_batch(pairs, length, mesh, precomputed=reference == "precomputed")
    forward = Forward(graphdef, chunk=chunk_size, row_groups=mesh.shape["data"] * mesh.shape["fsdp"])
    step = make_train_step(
        forward=forward, objective=from_config(config.loss, reference), optimizer=optimizer, schedule=schedule,
        reference_mode=reference, state_shardings=state_sh, batch_sharding=batch["input_ids"].sharding,
    )
    params_sh = state_sh.params["model"]
    ref_args = _with_shardings(params, params_sh) if reference == "frozen" else None
    start = time.perf_counter()
    lowered = parallel.under_mesh(step.lower, mesh)(_with_shardings(state, state_sh), batch, ref_args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    param_bytes = parallel.sharded_bytes(state.params, state_sh.params)
    opt_bytes = parallel.sharded_bytes(state.opt_state, state_sh.opt_state)
    return MemoryReport(
        mesh={a: int(mesh.shape[a]) for a in parallel.MESH_AXES},
        pairs=pairs,
        num_params=sum(x.size for x in jax.tree.leaves(state.params)),
        param_bytes_total=param_bytes.total,
        opt_bytes_total=opt_bytes.total,
        param_bytes_per_device=param_bytes.per_device,
        opt_bytes_per_device=opt_bytes.per_device,
        reference_bytes_per_device=parallel.sharded_bytes(params, params_sh).per_device if ref_args else 0,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        collectives=collective_counts(compiled.as_text()),
        compile_seconds=round(seconds, 1),
    )


def predicted_fit(budget_bytes: int, one: MemoryReport, two: MemoryReport) -> int:
    """Pairs per shard whose ``peak_bytes`` fit ``budget_bytes`` on the line through ``one``
    (1 pair per shard) and ``two`` (2); 0 when one pair does not fit."""
    if one.peak_bytes > budget_bytes:
        return 0
    return int(1 + (budget_bytes - one.peak_bytes) // max(two.peak_bytes - one.peak_bytes, 1))


def verified_fit(measure, budget_bytes: int, predicted: int, known: dict[int, MemoryReport]) -> tuple[int, MemoryReport]:
    """The largest pairs per shard in ``[1, predicted]`` whose compiled step fits ``budget_bytes``,
    by bisection (the peak grows with the batch); compiled reports are added to ``known``."""

    def report(n: int) -> MemoryReport:
        if n not in known:
            known[n] = measure(n)
        return known[n]

    low, high = 1, predicted  # one pair per shard fits (predicted > 0)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if report(mid).peak_bytes <= budget_bytes else (low, mid - 1)
    return low, report(low)


def _parse_mesh(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--mesh must look like 'data=2,fsdp=4', got {text!r}") from None


def _row(report: MemoryReport, devices: int) -> str:
    m = report.mesh
    return (
        f"| {devices} | {m['data']}/{m['fsdp']}/{m['tensor']} | {report.pairs} "
        f"| {report.state_bytes_per_device / GIB:.3f} | {report.state_bytes_per_device / report.ideal_per_device:.4f} "
        f"| {report.reference_bytes_per_device / GIB:.3f} | {report.argument_bytes / GIB:.3f} "
        f"| {report.temp_bytes / GIB:.3f} | {report.peak_bytes / GIB:.3f} "
        f"| {report.collectives['all-gather']}/{report.collectives['reduce-scatter']}/{report.collectives['all-reduce']} "
        f"| {report.compile_seconds:.0f} |"
    )


TABLE_HEADER = (
    "| devices | data/fsdp/tensor | pairs | params+opt GiB/dev | ratio to total/(fsdp*tensor) | reference GiB/dev "
    "| XLA args GiB/dev | XLA temp GiB/dev | args+temp GiB/dev | all-gather/reduce-scatter/all-reduce "
    "| compile s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)
TABLE_MESHES = {
    8: ["fsdp=8", "fsdp=4,tensor=2"],
    64: ["fsdp=64", "fsdp=16,tensor=4"],
    256: ["fsdp=256", "fsdp=64,tensor=4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: whatever JAX sees)")
    parser.add_argument("--mesh", action="append", default=[], help="mesh sizes, e.g. data=2,fsdp=4 (repeatable)")
    parser.add_argument("--model", choices=sorted(MODELS), default="8b")
    parser.add_argument("--pairs-per-shard", type=int, default=1, help="preference pairs per data*fsdp shard")
    parser.add_argument("--length", type=int, default=2048, help="tokens per row")
    parser.add_argument("--reference", choices=("frozen", "precomputed"), default="frozen")
    parser.add_argument("--scan-layers", choices=("on", "off"), default="on")
    parser.add_argument("--fit", default="", help="GiB budgets, e.g. 16,80,95: the largest pairs per shard that fit")
    parser.add_argument("--verify", action="store_true", help="compile each --fit prediction (and lower until it fits)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per mesh instead of table rows")
    parser.add_argument("--table", action="store_true", help="run the 8-, 64- and 256-device table (one subprocess each)")
    args = parser.parse_args()

    if args.table:
        print(TABLE_HEADER)
        for devices, meshes in TABLE_MESHES.items():
            cmd = [sys.executable, __file__, "--devices", str(devices), "--model", args.model, "--length",
                   str(args.length), "--reference", args.reference, "--scan-layers", args.scan_layers,
                   "--pairs-per-shard", str(args.pairs_per_shard)]
            for mesh in meshes:
                cmd += ["--mesh", mesh]
            cmd += (["--fit", args.fit] if args.fit else []) + (["--verify"] if args.verify else [])
            subprocess.run(cmd + (["--json"] if args.json else []), check=True)
        return

    model = MODELS[args.model].replace(scan_layers=args.scan_layers == "on")
    for text in args.mesh or ["fsdp=-1"]:
        mesh_config = _parse_mesh(text)
        shape = parallel.resolve_mesh_shape(mesh_config, jax.device_count())
        shards = shape[0] * shape[1]

        def measure(per_shard: int, mesh_config=mesh_config, shards=shards) -> MemoryReport:
            return analyse(model, mesh_config, pairs=per_shard * shards, length=args.length, reference=args.reference)

        report = measure(args.pairs_per_shard)
        fits: dict[str, Any] = {}
        if args.fit:
            known = {args.pairs_per_shard: report}
            for n in (1, 2):
                known.setdefault(n, measure(n))
            for budget in (float(b) for b in args.fit.split(",")):
                per_shard = predicted_fit(int(budget * GIB), known[1], known[2])
                fit = {"predicted_pairs_per_shard": per_shard}
                if args.verify and per_shard:
                    per_shard, at = verified_fit(measure, int(budget * GIB), per_shard, known)
                    fit.update(pairs_per_shard=per_shard, peak_gib=round(at.peak_bytes / GIB, 3))
                fits[f"{budget:g}"] = {**fit, "global_sequences": 2 * per_shard * shards}
        if args.json:
            print(json.dumps({**dataclasses.asdict(report), "length": args.length, "model": args.model,
                              "scan_layers": args.scan_layers, "fits": fits}), flush=True)
        else:
            print(_row(report, jax.device_count()) + (f" fits: {fits}" if fits else ""), flush=True)


if __name__ == "__main__":
    main()
