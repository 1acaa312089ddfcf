"""Compiled memory analysis of a DPO train step on fake CPU meshes (nothing is allocated).

The step is lowered and compiled ahead of time from abstract shapes (``jax.ShapeDtypeStruct``
with shardings from ``jaxalign.parallel``): forward of the policy over the concatenated batch
(chosen rows then rejected rows), label-aligned token log-probs computed in chunks from the
final hidden states, per-sequence sums, the DPO loss against precomputed reference log-probs
(no reference model in the step), gradients and an AdamW update. The model is
``jaxalign.models``' Llama built abstractly (``abstract_model``). Two steps can be measured:
``--step tool`` (default), the tool's own :func:`dpo_step`, written before the trainer
existed and still needed for ``--constrain-blocks``; ``--step trainer``, ``jaxalign.train``'s
real step (default config, one gradient-accumulation micro-batch).

For every mesh it reports, per device: parameter and optimizer bytes from the shardings
(compared with ``total / (fsdp * tensor)``), and XLA's ``compiled.memory_analysis()``
(arguments, outputs, temporaries; donated inputs alias the outputs).

    python tools/memory_analysis.py --devices 8 --mesh fsdp=8 --mesh data=2,fsdp=4
    python tools/memory_analysis.py --table       # the docs/scaling.md table: 8 and 64 devices
    python tools/memory_analysis.py --table --constrain-blocks   # activations pinned per block
    python tools/memory_analysis.py --table --step trainer       # jaxalign.train's step

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
from functools import partial  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxalign import losses, parallel  # noqa: E402
from jaxalign.models import ModelConfig, abstract_model  # noqa: E402
from jaxalign.models.attention import make_attention_mask  # noqa: E402
from jaxalign.models.config import remat_policy  # noqa: E402

GIB = 2**30

# Llama-2-7B's shapes (HF meta-llama/Llama-2-7b-hf config): 6.74e9 parameters.
LLAMA_7B = ModelConfig(
    family="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
    head_dim=128, intermediate_size=11008, max_position=4096, norm_eps=1e-5,
    dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full",
)
# A small model with the same structure, for the test suite.
LLAMA_TINY = dataclasses.replace(
    LLAMA_7B, vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
    intermediate_size=256, max_position=128,
)
MODELS = {"7b": LLAMA_7B, "tiny": LLAMA_TINY}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled step on one mesh."""

    mesh: dict[str, int]
    num_params: int
    param_bytes_total: int
    opt_bytes_total: int
    param_bytes_per_device: int
    opt_bytes_per_device: int
    argument_bytes: int  # compiled.memory_analysis(): per device
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

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


def abstract_batch(pairs: int, length: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of an unpacked preference batch (docs/architecture.md): ``2 * pairs`` rows."""
    rows = parallel.batch_sharding(mesh)
    spec = {
        "input_ids": ((2 * pairs, length), jnp.int32),
        "positions": ((2 * pairs, length), jnp.int32),
        "segment_ids": ((2 * pairs, length), jnp.int32),
        "loss_mask": ((2 * pairs, length), jnp.float32),
        "sequence_ids": ((2 * pairs, length), jnp.int32),
        "pair_mask": ((pairs,), jnp.float32),
        "ref_chosen_logps": ((pairs,), jnp.float32),
        "ref_rejected_logps": ((pairs,), jnp.float32),
    }
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in spec.items()}


def constrained_hidden_states(model, input_ids, *, positions, segment_ids):
    """``model.hidden_states`` with the residual stream pinned to batch sharding at every block.

    Runs the decoder through its documented interface (``embed``, ``position_encoding``,
    ``layers``, ``final_norm``) and ``parallel.with_logical_constraint(x, ("batch", "length",
    "embed"))`` after the embedding and after each block; the rest (mask, remat policy) as
    ``CausalLM.hidden_states``.
    Needed only while the models do not constrain activations themselves.
    """
    index = jnp.arange(input_ids.shape[1])
    mask = make_attention_mask(index, index, segment_ids, segment_ids, positions, positions,
                               model.config.sliding_window)
    encoding = model.position_encoding(positions)

    def apply(block, x):
        return block(x, encoding, mask, None, None)[0]

    if model.config.remat != "none":
        apply = nnx.remat(apply, policy=remat_policy(model.config.remat))
    names = ("batch", "length", "embed")
    x = parallel.with_logical_constraint(model.embed(input_ids, positions), names)
    for block in model.layers:
        x = parallel.with_logical_constraint(apply(block, x), names)
    return model.final_norm(x)


def dpo_step(graphdef, optimizer: optax.GradientTransformation, *, beta: float = 0.1, chunk_size: int = 128,
             constrain_blocks: bool = False):
    """``(params, opt_state, batch) -> (params, opt_state, loss)``: one DPO + AdamW step."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        forward = partial(constrained_hidden_states, model) if constrain_blocks else model.hidden_states
        hidden = forward(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        token = losses.token_logps_from_hidden(
            hidden, model.unembedding(), batch["input_ids"], chunk_size=chunk_size, segment_ids=batch["segment_ids"]
        )
        pairs = batch["pair_mask"].shape[0]
        sums, _ = losses.segment_logps(token, batch["loss_mask"], batch["sequence_ids"], num_sequences=2 * pairs)
        loss, _ = losses.dpo(
            sums[:pairs], sums[pairs:], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
            beta=beta, weights=batch["pair_mask"],
        )
        return loss

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _Lowerable(NamedTuple):
    """A jitted step with its abstract arguments, and the parameter / optimizer parts of its state."""

    step: Any
    args: tuple
    params: Any
    params_sh: Any
    opt_state: Any
    opt_sh: Any


def _tool_step(graphdef, params, mesh, batch, *, chunk_size: int, constrain_blocks: bool) -> _Lowerable:
    optimizer = optax.adamw(1e-5, weight_decay=0.0)
    opt_state = jax.eval_shape(optimizer.init, params)
    params_sh = parallel.param_shardings(params, mesh)
    opt_sh = parallel.param_shardings(opt_state, mesh)
    step = jax.jit(
        dpo_step(graphdef, optimizer, chunk_size=chunk_size, constrain_blocks=constrain_blocks),
        in_shardings=(params_sh, opt_sh, parallel.batch_sharding(mesh)),
        out_shardings=(params_sh, opt_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0, 1),
    )
    args = (_with_shardings(params, params_sh), _with_shardings(opt_state, opt_sh), batch)
    return _Lowerable(step, args, params, params_sh, opt_state, opt_sh)


def _trainer_step(graphdef, params, mesh, batch, *, chunk_size: int) -> _Lowerable:
    """``jaxalign.train``'s step (default config: DPO, AdamW) with precomputed reference log-probs."""
    from jaxalign.objectives import from_config
    from jaxalign.scoring.forward import Forward
    from jaxalign.train.config import base_config
    from jaxalign.train.optimizer import make_optimizer
    from jaxalign.train.state import init_state
    from jaxalign.train.step import make_train_step

    config = base_config()
    optimizer, schedule = make_optimizer(config.optimizer, 1000)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), {"model": params})
    state_sh = parallel.param_shardings(state, mesh)
    micro = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))  # [A=1 micro-batch, rows, ...]
    step = make_train_step(
        forward=Forward(graphdef, chunk=chunk_size), objective=from_config(config.loss, "precomputed"),
        optimizer=optimizer, schedule=schedule, reference_mode="precomputed",
        state_shardings=state_sh, batch_sharding=micro,
    )
    micro_batch = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype, sharding=micro) for k, v in batch.items()}
    args = (_with_shardings(state, state_sh), micro_batch, None)
    return _Lowerable(step, args, state.params, state_sh.params, state.opt_state, state_sh.opt_state)


def analyse(model_config: ModelConfig, mesh_config: dict[str, int], *, pairs: int, length: int,
            chunk_size: int = 128, step: str = "tool", constrain_blocks: bool = False,
            devices=None) -> MemoryReport:
    """Lowers and compiles a DPO step for ``mesh_config`` from abstract shapes; reports bytes.

    ``step``: ``"tool"`` (:func:`dpo_step`) or ``"trainer"`` (``jaxalign.train``'s step, its
    default DPO + AdamW config, gradient-accumulation scan over one micro-batch).
    ``constrain_blocks`` (tool step only): pin activations to batch sharding at block
    boundaries (:func:`constrained_hidden_states`). Lowering happens under
    ``jax.set_mesh(mesh)``, so constraints inside the model take effect either way.
    """
    if step not in ("tool", "trainer"):
        raise ValueError(f"step must be 'tool' or 'trainer', got {step!r}")
    if step == "trainer" and constrain_blocks:
        raise ValueError("constrain_blocks applies to the tool's step only (the trainer calls model.hidden_states)")
    mesh = parallel.make_mesh(mesh_config, devices=devices)
    graphdef, params = nnx.split(abstract_model(model_config))
    batch = abstract_batch(pairs, length, mesh)
    if step == "tool":
        built = _tool_step(graphdef, params, mesh, batch, chunk_size=chunk_size, constrain_blocks=constrain_blocks)
    else:
        built = _trainer_step(graphdef, params, mesh, batch, chunk_size=chunk_size)
    with jax.set_mesh(mesh):
        lowered = built.step.lower(*built.args)
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    param_bytes = parallel.sharded_bytes(built.params, built.params_sh)
    opt_bytes = parallel.sharded_bytes(built.opt_state, built.opt_sh)
    return MemoryReport(
        mesh={a: int(mesh.shape[a]) for a in parallel.MESH_AXES},
        num_params=sum(x.size for x in jax.tree.leaves(built.params)),
        param_bytes_total=param_bytes.total,
        opt_bytes_total=opt_bytes.total,
        param_bytes_per_device=param_bytes.per_device,
        opt_bytes_per_device=opt_bytes.per_device,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
    )


def _parse_mesh(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--mesh must look like 'data=2,fsdp=4', got {text!r}") from None


def _row(report: MemoryReport, devices: int) -> str:
    m = report.mesh
    return (
        f"| {devices} | {m['data']}/{m['fsdp']}/{m['tensor']} | {report.state_bytes_total / GIB:.2f} "
        f"| {report.param_bytes_per_device / GIB:.3f} | {report.opt_bytes_per_device / GIB:.3f} "
        f"| {report.state_bytes_per_device / GIB:.3f} | {report.ideal_per_device / GIB:.3f} "
        f"| {report.state_bytes_per_device / report.ideal_per_device:.4f} "
        f"| {report.argument_bytes / GIB:.3f} | {report.output_bytes / GIB:.3f} "
        f"| {report.alias_bytes / GIB:.3f} | {report.temp_bytes / GIB:.3f} |"
    )


TABLE_HEADER = (
    "| devices | data/fsdp/tensor | params+opt total GiB | params GiB/dev | opt GiB/dev | params+opt GiB/dev "
    "| total/(fsdp*tensor) GiB | ratio | XLA args GiB/dev | XLA outputs GiB/dev | XLA aliased GiB/dev "
    "| XLA temp GiB/dev |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)
TABLE_MESHES = {
    8: ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"],
    64: ["fsdp=64", "data=8,fsdp=8", "fsdp=16,tensor=4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: whatever JAX sees)")
    parser.add_argument("--mesh", action="append", default=[], help="mesh sizes, e.g. data=2,fsdp=4 (repeatable)")
    parser.add_argument("--model", choices=sorted(MODELS), default="7b")
    parser.add_argument("--pairs", type=int, default=0, help="preference pairs per step (default: one per data*fsdp shard)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per row")
    parser.add_argument("--step", choices=("tool", "trainer"), default="tool",
                        help="the tool's own DPO step, or jaxalign.train's step")
    parser.add_argument("--constrain-blocks", action="store_true",
                        help="pin activations to batch sharding at every block boundary")
    parser.add_argument("--json", action="store_true", help="print one JSON object per mesh instead of table rows")
    parser.add_argument("--table", action="store_true", help="run the 8- and 64-device table (one subprocess each)")
    args = parser.parse_args()

    if args.table:
        print(TABLE_HEADER)
        for devices, meshes in TABLE_MESHES.items():
            cmd = [sys.executable, __file__, "--devices", str(devices), "--model", args.model, "--length", str(args.length)]
            cmd += ["--step", args.step] + (["--constrain-blocks"] if args.constrain_blocks else [])
            for mesh in meshes:
                cmd += ["--mesh", mesh]
            subprocess.run(cmd, check=True)
        return

    model = MODELS[args.model]
    for text in args.mesh or ["fsdp=-1"]:
        mesh_config = _parse_mesh(text)
        rows = parallel.resolve_mesh_shape(mesh_config, jax.device_count())
        pairs = args.pairs or rows[0] * rows[1]
        report = analyse(model, mesh_config, pairs=pairs, length=args.length, step=args.step,
                         constrain_blocks=args.constrain_blocks)
        if args.json:
            print(json.dumps({**dataclasses.asdict(report), "pairs": pairs, "length": args.length}), flush=True)
        else:
            print(_row(report, jax.device_count()), flush=True)


if __name__ == "__main__":
    main()
