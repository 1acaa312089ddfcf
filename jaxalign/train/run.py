"""The offline trainer's assembly: ``prepare(config, workdir) -> Run``, from the builders.

Order (``jaxalign.train.build``): multi-host start-up, mesh, the tiny model and synthetic data
when asked for, tokenizer, data loaders, the objective, policy parameters (placed on the mesh
as they are read), the teachers' signals of a distillation loss (``jaxalign.train.distill``), the
reference (a frozen copy, or the precomputed log-prob cache; VPO's calibration samples),
optimizer and state, the jitted steps, the batch placers.

LoRA (``lora.rank > 0``): the train state holds the adapters (and the objective's extra
parameters) only; the frozen base weights are ``Run.reference_params``, which the steps take
as their third argument whatever the reference mode (``jaxalign.train.step``). The reference is
the base with the adapters off: no copy of the weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxalign import parallel
from jaxalign.caches import calibration
from jaxalign.caches.fingerprint import params_digest, source_digest, tokenizer_digest
from jaxalign.caches.reference import CoverageError, ReferenceCache, build_reference_cache
from jaxalign.data.loader import Loader
from jaxalign.data.pipeline import mask_for_loss
from jaxalign.data.sources import resolve_source
from jaxalign.models.lora import adapters_off
from jaxalign.objectives import Objective, from_config
from jaxalign.perf.utilisation import flops_per_token, peak_flops
from jaxalign.scoring.forward import sequence_logps_fn
from jaxalign.train import build
from jaxalign.train.batches import BatchPlacer
from jaxalign.train.build import Model, RunError
from jaxalign.train.config import DISTILL_LOSSES, grad_accum_steps, validate
from jaxalign.train.distill import attach_teacher_signals
from jaxalign.train.state import TrainState
from jaxalign.train.step import reference_keys

__all__ = ["Run", "RunError", "prepare"]

CACHE_BATCH_FACTOR = 4  # reference.cache_batch_size = 0: this many times the loader's batch


@dataclasses.dataclass
class Run:
    """The assembled pieces of an offline run (see module docstring)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    tokenizer: Any
    train_loader: Loader
    eval_loader: Loader | None
    data_summary: str
    graphdef: nnx.GraphDef
    state: TrainState
    reference_params: Any
    objective: Objective
    optimizer: optax.GradientTransformation
    train_step: Any
    eval_step: Any
    total_steps: int
    accum: int
    reference_caches: dict[str, ReferenceCache]
    place_train: BatchPlacer
    place_eval: BatchPlacer | None
    is_main: bool
    eval_start: dict[str, Any] | None = None  # the eval loader's initial position (rewound per eval)
    flops_per_token: int = 0  # model FLOPs per real token of a train step (jaxalign.perf.utilisation)
    peak_flops: float | None = None  # peak FLOP/s of this process's devices (None: unknown, no MFU)


def _cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.reference.cache_dir or os.path.join(workdir, "reference_cache")


def _calibrated(config: ml_collections.ConfigDict, workdir: str, loaders: dict[str, Loader | None], tokenizer: Any,
                reference: Model, is_main: bool) -> dict[str, Loader | None]:
    """VPO ``reference_samples``: each example gets a sampled calibration sequence (cached)."""
    model = nnx.merge(reference.graphdef, reference.params)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    digests = {"params": params_digest(reference.params), "tokenizer": tokenizer_digest(tokenizer)}
    out: dict[str, Loader | None] = {}
    for split, loader in loaders.items():
        if loader is not None:
            loader = calibration.calibrated_loader(
                loader, model, cache_dir=_cache_dir(config, workdir), digests={**digests, "split": split}, eos_id=eos,
                pad_id=pad, max_new_tokens=config.loss.vpo_max_new_tokens, max_length=config.data.max_length,
                seed=config.seed + (split == "eval"), write=is_main,
            )
            parallel.barrier(f"calibration-{split}")
        out[split] = loader
    return out


def _cache_batch_size(config: ml_collections.ConfigDict, loader: Loader, mesh: Mesh) -> int:
    """Pairs per global batch of the cache pass: ``reference.cache_batch_size``, or
    ``CACHE_BATCH_FACTOR`` times the loader's batch; a multiple of the data shards and the
    mesh's batch axes."""
    blocks = build.batch_devices(mesh)
    multiple = math.lcm(loader.shard_count, blocks)
    size = config.reference.cache_batch_size or CACHE_BATCH_FACTOR * loader.batch_size
    if size % multiple:
        raise RunError(
            f"reference.cache_batch_size = {size} must be a multiple of {multiple} (the batch is split over "
            f"{loader.shard_count} data shard(s) and the mesh's batch axes data*fsdp = {blocks})"
        )
    return size


def _reference_caches(config: ml_collections.ConfigDict, workdir: str, loaders: dict[str, Loader | None],
                      tokenizer: Any, reference: Model, objective: Objective, mesh: Mesh,
                      is_main: bool) -> dict[str, ReferenceCache]:
    """Loads or computes the precomputed reference log-probs of the train and eval examples."""
    from tqdm.auto import tqdm

    fn = sequence_logps_fn(build.forward_for(config, reference.graphdef, mesh), objective.sequences_per_pair)
    keys = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask")
    settings = {"max_length": config.data.max_length, "max_prompt_length": config.data.max_prompt_length,
                "mask": mask_for_loss(config.loss.name), "dtype": config.model.dtype, "format": config.data.format}
    common = {"params": params_digest(reference.params), "tokenizer": tokenizer_digest(tokenizer)}
    caches = {}
    for split, spec in (("train", config.data.train), ("eval", config.data.eval or config.data.train)):
        loader = loaders[split]
        if loader is None:
            continue

        def progress(passes: Loader, split: str = split):
            return tqdm(passes, total=passes.batches_in_epoch(0), desc=f"reference cache ({split})", unit="batch",
                        dynamic_ncols=True, disable=not (is_main and config.progress_bar))

        try:
            caches[split] = build_reference_cache(
                loader, sums=lambda b: fn(reference.params, parallel.global_batch({k: b[k] for k in keys}, mesh)),
                cache_dir=_cache_dir(config, workdir), batch_size=_cache_batch_size(config, loader, mesh),
                digests={**common, "data": source_digest(resolve_source(spec)), "settings": {**settings, "split": split}},
                write=is_main, progress=progress,
            )
        except CoverageError as e:
            raise RunError(f"reference.mode = 'precomputed' ({split} examples): {e}") from None
    return caches


def _warn_about_schedule(config: ml_collections.ConfigDict, steps: int) -> None:
    """A warning when the warmup does not end before the run does: the learning rate never
    reaches its peak (a short trial of a recipe then learns next to nothing)."""
    warmup = config.optimizer.warmup_steps
    if warmup >= steps:
        reached = config.optimizer.learning_rate * steps / warmup
        print(f"warning: optimizer.warmup_steps = {warmup} >= the run's {steps} steps: the learning rate never "
              f"reaches its peak {config.optimizer.learning_rate:g} (it ends at {reached:.3g}); set "
              f"--config.optimizer.warmup_steps to a fraction of the steps", file=sys.stderr, flush=True)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Assembles an offline run from a validated config (see module docstring)."""
    validate(config)
    parallel.initialize_distributed(config.distributed)
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    mesh = build.build_mesh(config.mesh)
    config = build.resolve_inputs(config, workdir, is_main)
    tokenizer = build.build_tokenizer(config)
    loaders = build.build_data(config, tokenizer, mesh)
    accum = grad_accum_steps(config)
    total_steps = build.total_steps(config, loaders.train, accum)
    if is_main:
        _warn_about_schedule(config, total_steps)
    objective = from_config(config.loss, config.reference.mode, config.distill)
    policy = build.build_policy(config, mesh, objective)
    lora = config.lora.rank > 0
    trainable, base = build.trainable(config, policy)

    mode = config.reference.mode
    reference, reference_params, caches = None, None, {}
    split_loaders = {"train": loaders.train, "eval": loaders.eval}
    if config.loss.name in DISTILL_LOSSES:
        split_loaders = attach_teacher_signals(config, workdir, split_loaders, tokenizer, policy, mesh, is_main,
                                               batch_size=lambda loader: _cache_batch_size(config, loader, mesh))
    if objective.uses_reference or objective.sequences_per_pair == 3:
        reference = (Model(policy.graphdef, adapters_off(base, trainable["model"]), policy.config) if lora
                     else build.build_reference(config, mesh, policy))
        if objective.sequences_per_pair == 3:
            split_loaders = _calibrated(config, workdir, split_loaders, tokenizer, reference, is_main)
        if mode == "precomputed":
            caches = _reference_caches(config, workdir, split_loaders, tokenizer, reference, objective, mesh, is_main)
        if mode == "frozen":
            reference_params = reference.params
    train_loader, eval_loader = split_loaders["train"], split_loaders["eval"]
    reference_config = reference.config if reference_params is not None else None
    if lora:
        reference_params = base  # the steps' third argument; the reference forward is the policy's graph

    state, shardings, optimizer, schedule = build.build_state(config, trainable, mesh, total_steps)
    in_step = reference if reference_params is not None and not lora else None
    steps = build.build_steps(config, mesh, objective, policy=policy.graphdef,
                              reference=in_step.graphdef if in_step else None, optimizer=optimizer,
                              schedule=schedule, state_shardings=shardings)

    def placer(split: str, loader: Loader) -> BatchPlacer:
        cache = caches.get(split)
        lookups = (lambda host: cache.lookup(host["example_index"]),) if cache else ()
        added = reference_keys(objective, mode) if cache else ()
        return build.batch_placer(config, mesh, objective, loader, lookups=lookups, added=added)

    return Run(
        config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, train_loader=train_loader,
        eval_loader=eval_loader, data_summary=loaders.report.summary(), graphdef=policy.graphdef, state=state,
        reference_params=reference_params, objective=objective, optimizer=optimizer, train_step=steps.train,
        eval_step=steps.eval, total_steps=total_steps, accum=accum, reference_caches=caches,
        place_train=placer("train", train_loader),
        place_eval=placer("eval", eval_loader) if eval_loader is not None else None, is_main=is_main,
        eval_start=eval_loader.get_state() if eval_loader is not None else None,
        flops_per_token=flops_per_token(policy.config, reference_config),
        peak_flops=peak_flops(config.peak_flops_per_device, mesh.local_devices, config.model.dtype),
    )
