"""The trainer's builders: each piece of a run, built on its own from the config.

A driver (the offline trainer's ``jaxalign.train.run.prepare``, the online and distillation
drivers) calls the ones it needs, in this order, and hands the results to the step runner
(``jaxalign.train.runner``):

``build_mesh`` -> ``resolve_inputs`` (synthetic data, tiny model) -> ``build_tokenizer`` ->
``build_data`` -> ``build_policy`` (parameters placed on the mesh as they are read, plus the
objective's extra parameters) -> ``build_reference`` (a frozen copy, or another checkpoint) ->
``build_state`` (optimizer and sharded train state) -> ``build_steps`` (the jitted train and
eval steps for an objective) -> ``batch_placer`` (host batches -> global device arrays).
Errors a user can fix are ``RunError`` with a message saying what to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import models, parallel
from jaxalign.data.loader import Loader
from jaxalign.data.records import DataError
from jaxalign.data.pipeline import Loaders, build_loaders_from_config
from jaxalign.data.synthetic import SYNTHETIC_SOURCE, synthetic_records, write_synthetic
from jaxalign.models.lora import add_adapters, load_adapter, split_adapters
from jaxalign.models.tiny import ensure_tiny_checkpoint
from jaxalign.objectives import Objective
from jaxalign.scoring.forward import Forward
from jaxalign.tokenizers import load_tokenizer
from jaxalign.train.batches import BATCH_AXES, BatchPlacer, Lookup, check_keys
from jaxalign.train.optimizer import make_optimizer
from jaxalign.train.state import TrainState, init_state
from jaxalign.train.step import device_keys, make_eval_step, make_train_step

__all__ = [
    "Model", "RunError", "Steps", "batch_devices", "batch_placer", "build_data", "build_mesh", "build_policy",
    "build_reference", "build_state", "build_steps", "build_tokenizer", "check_context", "forward_for",
    "load_model", "model_dir", "resolve_inputs", "total_steps",
]


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to change. ``exit_code``:
    the command's exit status (2: the run cannot start; 1: it failed on the way, e.g. a reward
    function raised, with what it had computed kept on disk)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass
class Model:
    """A model split for the step: its graph, its parameters (a plain pytree) and its config."""

    graphdef: nnx.GraphDef
    params: Any
    config: models.ModelConfig


@dataclasses.dataclass
class Steps:
    """The jitted steps of a run (``jaxalign.train.step``)."""

    train: Any
    eval: Any


def build_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
    """The mesh; a fully specified mesh smaller than the machine uses the first devices."""
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    devices = None
    if -1 not in sizes and math.prod(sizes) < jax.device_count() and jax.process_count() == 1:
        devices = jax.devices()[: math.prod(sizes)]
    try:
        return parallel.make_mesh(mesh_config, devices=devices)
    except ValueError as e:
        raise RunError(f"mesh: {e}") from None


def batch_devices(mesh: Mesh) -> int:
    """How many devices split a batch's rows: the mesh's ``data * fsdp``."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def resolve_inputs(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> ml_collections.ConfigDict:
    """Writes the synthetic data and the tiny model when the config asks; returns the config
    with ``data.train`` pointing at real files."""
    config = ml_collections.ConfigDict(config.to_dict())
    corpus = None
    if config.data.train == SYNTHETIC_SOURCE:
        sft = config.loss.name == "sft"
        path = os.path.join(workdir, "data", "synthetic-sft.jsonl" if sft else "synthetic.jsonl")
        if is_main and not os.path.exists(path):
            write_synthetic(path, config.data.synthetic_pairs, config.seed, sft=sft)
        parallel.barrier("synthetic-data")
        config.data.train = path
        records = synthetic_records(config.data.synthetic_pairs, config.seed)
        corpus = [r["prompt"] + r[side] for r in records for side in ("chosen", "rejected")]
    if config.model.create_if_missing:
        if is_main:
            tiny = config.model.tiny
            try:
                ensure_tiny_checkpoint(
                    config.model.path, family=tiny.family, bpe_vocab_size=tiny.vocab_size, corpus=corpus,
                    seed=config.seed, max_position=max(config.data.buckets), hidden_size=tiny.hidden_size,
                    num_layers=tiny.num_layers, num_heads=tiny.num_heads, intermediate_size=tiny.intermediate_size,
                    num_kv_heads=tiny.num_heads if tiny.family == "gpt2" else tiny.num_kv_heads,
                )
            except (FileExistsError, ValueError) as e:
                raise RunError(f"model.create_if_missing: {e}") from None
        parallel.barrier("tiny-model")
    if not os.path.isfile(os.path.join(config.model.path, "config.json")):
        raise RunError(
            f"model.path {config.model.path!r} holds no config.json (a Hugging Face checkpoint directory is "
            "expected; set model.create_if_missing=True to write a tiny random model there)"
        )
    check_context(config)
    return config


def check_context(config: ml_collections.ConfigDict) -> None:
    """``RunError`` when ``data.max_length`` exceeds the positions of the policy's (or the
    reference's) model: read from its ``config.json``, before any weight is loaded."""
    for key in ("model.path", "reference.path"):
        path = config.model.path if key == "model.path" else config.reference.path
        if not path:
            continue
        try:
            positions = models.load_config(path).max_position
        except (models.CheckpointError, models.UnsupportedModelError) as e:
            raise RunError(f"{key}: {e}") from None
        if config.data.max_length > positions:
            raise RunError(
                f"data.max_length = {config.data.max_length} exceeds the context of the model at {key} "
                f"({path}): {positions} positions (max_position_embeddings). Sequences that long cannot be "
                f"scored; set --config.data.max_length={positions} or less (and data.buckets to match)"
            )


def build_tokenizer(config: ml_collections.ConfigDict) -> Any:
    """The tokenizer of ``model.tokenizer`` (or ``model.path``); ``RunError`` when it has ids
    beyond the model's vocabulary (an embedding lookup would silently clamp them)."""
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path)
    vocab = models.load_config(config.model.path).vocab_size
    if len(tokenizer) > vocab:
        raise RunError(
            f"the tokenizer ({config.model.tokenizer or config.model.path}) has {len(tokenizer)} tokens, more than "
            f"the model's vocabulary of {vocab} (vocab_size in {config.model.path}/config.json): token ids past "
            f"{vocab - 1} have no embedding. Use the model's own tokenizer (model.tokenizer)"
        )
    return tokenizer


def build_data(config: ml_collections.ConfigDict, tokenizer: Any, mesh: Mesh) -> Loaders:
    """This process's train and eval loaders (packed rows a multiple of its devices); process 0
    writes the tokenized cache, the others open it after a barrier."""
    shard = parallel.data_shard(mesh)
    try:
        return build_loaders_from_config(config, tokenizer, shard_index=shard.index, shard_count=shard.count,
                                         row_multiple=max(1, batch_devices(mesh) // shard.count),
                                         writer=parallel.is_main_process(),
                                         barrier=lambda: parallel.barrier("data-cache"))
    except DataError as e:
        raise RunError(f"data: {e}\n(to skip such records and count them in the data report instead, set "
                       "--config.data.on_bad_record=skip)") from None
    except ValueError as e:
        raise RunError(f"data: {e}") from None


def total_steps(config: ml_collections.ConfigDict, train_loader: Loader, accum: int) -> int:
    """``steps``, or ``ceil(epochs * micro-batches per epoch / accum)``."""
    if config.steps > 0:
        return config.steps
    return max(1, math.ceil(config.epochs * train_loader.batches_in_epoch(0) / accum))


SCAN_LAYERS = {"auto": None, "on": True, "off": False}  # model.scan_layers -> from_pretrained(scan_layers=)


def load_model(config: ml_collections.ConfigDict, path: str, mesh: Mesh, *, lora: bool = False) -> Model:
    """The checkpoint at ``path`` with the run's dtypes and layout, its parameters placed on ``mesh``;
    with ``lora``, adapters of the ``lora`` config group on its projections (fresh, or read from
    the PEFT directory ``lora.adapter``)."""
    try:
        model = models.from_pretrained(
            path, dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype),
            sharding_fn=parallel.sharding_fn(mesh), remat=config.model.remat, query_block=config.model.query_block,
            scan_layers=SCAN_LAYERS[config.model.scan_layers],
        )
    except (FileNotFoundError, models.CheckpointError, models.UnsupportedModelError) as e:
        raise RunError(f"loading {path}: {e}") from None
    if lora:
        add_adapters(model, rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets),
                     seed=config.seed, sharding_fn=parallel.sharding_fn(mesh))
        if config.lora.adapter:
            try:
                adapter = load_adapter(model, config.lora.adapter)
            except ValueError as e:
                raise RunError(f"lora.adapter: {e}") from None
            if float(adapter.get("lora_alpha", config.lora.alpha)) != config.lora.alpha:
                raise RunError(f"lora.adapter {config.lora.adapter}: lora_alpha {adapter['lora_alpha']}, the run's "
                               f"lora.alpha {config.lora.alpha}: set --config.lora.alpha={adapter['lora_alpha']}")
    graphdef, params = nnx.split(model, nnx.Param)
    return Model(graphdef, params, model.config)


def model_dir(path: str, key: str) -> str:
    """``path`` if it holds a checkpoint (``config.json``), else the export of the jaxalign run
    directory ``path``; ``RunError`` naming ``key`` when neither is there."""
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    export = os.path.join(path, "export")
    if os.path.isfile(os.path.join(export, "config.json")):
        return export
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise RunError(f"{key} {path} is a run directory without an export yet: finish that run (its export is "
                       "written at the end) or name a checkpoint directory")
    raise RunError(f"{key} {path} holds no config.json (a Hugging Face checkpoint directory or a jaxalign run "
                   "directory is expected)")


def build_policy(config: ml_collections.ConfigDict, mesh: Mesh, objective: Objective) -> Model:
    """The policy from ``model.path``; ``params`` is ``{"model": ..., **objective's extra}`` (with
    ``lora.rank > 0`` the model's parameters hold its adapters too: ``models.lora.split_adapters``)."""
    policy = load_model(config, config.model.path, mesh, lora=config.lora.rank > 0)
    extra = objective.init_extra(policy.config, config.seed) if objective.init_extra else {}
    return dataclasses.replace(policy, params={"model": policy.params, **extra})


def trainable(config: ml_collections.ConfigDict, policy: Model) -> tuple[Any, Any]:
    """``(trained parameters, frozen LoRA base or None)``. With ``lora.rank > 0`` the train state
    holds only the adapters (and the objective's extra parameters); the base weights stay out of
    it, cast to ``lora.base_dtype`` when that is set (the adapters keep ``model.param_dtype``)."""
    if config.lora.rank <= 0:
        return policy.params, None
    adapters, base = split_adapters(policy.params["model"])
    if config.lora.base_dtype:
        dtype = jnp.dtype(config.lora.base_dtype)
        base = jax.tree.map(lambda x: jax.device_put(x.astype(dtype), x.sharding), base)
    return {**policy.params, "model": adapters}, base


def build_reference(config: ml_collections.ConfigDict, mesh: Mesh, policy: Model) -> Model:
    """The reference: ``reference.path`` when it names another checkpoint, else a copy of the
    policy's initial weights."""
    path = config.reference.path
    if path and os.path.abspath(path) != os.path.abspath(config.model.path):
        return load_model(config, path, mesh)
    return Model(policy.graphdef, jax.tree.map(jnp.copy, policy.params["model"]), policy.config)


def build_state(
    config: ml_collections.ConfigDict, params: Any, mesh: Mesh, steps: int
) -> tuple[TrainState, Any, optax.GradientTransformation, optax.Schedule]:
    """``(state, state_shardings, optimizer, schedule)``; ``params`` are donated to the state
    (no second copy of the model in memory)."""
    optimizer, schedule = make_optimizer(config.optimizer, steps)
    init = lambda p: init_state(p, optimizer, config.seed)  # noqa: E731
    shardings = parallel.param_shardings(jax.eval_shape(init, params), mesh)
    state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)
    return state, shardings, optimizer, schedule


def forward_for(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh) -> Forward:
    """A model's forward with the run's LM-head layout (``model.logits_chunk``, ``model.lm_head``)."""
    return Forward(graphdef, chunk=config.model.logits_chunk, row_groups=batch_devices(mesh),
                   all_positions=config.model.lm_head == "all")


def build_steps(
    config: ml_collections.ConfigDict, mesh: Mesh, objective: Objective, *, policy: nnx.GraphDef,
    reference: nnx.GraphDef | None, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
    state_shardings: Any,
) -> Steps:
    """The jitted train and eval steps of ``objective`` (graphs of the policy and reference)."""
    reference_forward = forward_for(config, reference, mesh) if reference is not None else None
    common = dict(forward=forward_for(config, policy, mesh), objective=objective, reference_mode=config.reference.mode,
                  reference=reference_forward, lora=config.lora.rank > 0)
    train = make_train_step(
        optimizer=optimizer, schedule=schedule, state_shardings=state_shardings,
        batch_sharding=NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)),
        max_consecutive_nonfinite=config.max_consecutive_nonfinite, nan_at_steps=tuple(config.debug.nan_at_steps),
        **common,
    )
    # Traced under the mesh: the models' activation constraints pin batch rows to (data, fsdp).
    return Steps(train=parallel.under_mesh(train, mesh), eval=parallel.under_mesh(make_eval_step(**common), mesh))


def batch_placer(config: ml_collections.ConfigDict, mesh: Mesh, objective: Objective, loader: Loader,
                 lookups: tuple[Lookup, ...] = (), added: tuple[str, ...] = ()) -> BatchPlacer:
    """The ``BatchPlacer`` of ``loader``'s batches for ``objective``'s steps; ``RunError`` when
    the batches lack a key the steps read (and no lookup ``added`` it) or hold one nothing reads."""
    keys = device_keys(objective, config.reference.mode)
    try:
        check_keys(loader.batch_at(0, 0).keys(), device_keys=keys, added=added)
    except ValueError as e:
        raise RunError(f"objective {objective.name!r}: {e}") from None
    return BatchPlacer(mesh, loader.shard_count, keys, lookups)
