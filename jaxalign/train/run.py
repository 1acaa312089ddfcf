"""Builds everything a run needs from its config: mesh, tokenizer, data, model, state, steps.

``prepare(config, workdir)`` returns a ``Run``: the pieces the loop (``jaxalign.train.loop``)
drives. Order: multi-host start-up, mesh, the tiny model and synthetic data when asked for,
tokenizer, data loaders, policy parameters (placed on the mesh as they are read), the
reference (a frozen copy, or the precomputed log-prob cache), optimizer and state, the
jitted step functions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import models, parallel
from jaxalign.data.loader import Loader
from jaxalign.data.pipeline import build_loaders_from_config, mask_for_loss
from jaxalign.data.sources import resolve_source
from jaxalign.tokenizers import load_tokenizer
from jaxalign.train import calibration
from jaxalign.train import reference as ref_cache
from jaxalign.train.config import grad_accum_steps, validate
from jaxalign.train.forward import init_reward_head
from jaxalign.train.objectives import Objective, make_objective
from jaxalign.train.optimizer import make_optimizer
from jaxalign.train.state import TrainState, init_state
from jaxalign.train.step import make_eval_step, make_reference_fn, make_train_step
from jaxalign.train.synthetic import SYNTHETIC_SOURCE, synthetic_records, write_synthetic
from jaxalign.train.tiny import ensure_tiny_model
from jaxalign.train.utilisation import flops_per_token, peak_flops

__all__ = ["Run", "RunError", "prepare"]

BATCH_AXES = ("data", "fsdp")
# Keys of a batch the step reads (example_index stays on the host: it keys the reference cache).
DEVICE_KEYS = (
    "input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask",
    "ref_chosen_logps", "ref_rejected_logps", "ref_calibration_logps",
)


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to change."""


@dataclasses.dataclass
class Run:
    """The assembled pieces of a run (see module docstring)."""

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
    reference_caches: dict[str, ref_cache.ReferenceCache]
    is_main: bool
    eval_start: dict[str, Any] | None = None  # the eval loader's initial position (rewound per eval)
    flops_per_token: int = 0  # model FLOPs per real token of a train step (jaxalign.train.utilisation)
    peak_flops: float | None = None  # peak FLOP/s of this process's devices (None: unknown, no MFU)

    def device_batch(self, host: dict[str, np.ndarray], *, stacked: bool) -> dict[str, jax.Array]:
        """This process's share of a global batch -> global arrays split over the batch axes.

        ``stacked`` batches have the leading micro-batch axis ``[A, ...]``; rows (axis 1) are
        split. Precomputed reference log-probs are looked up here by ``example_index``.
        """
        host = dict(host)
        cache = self.reference_caches.get("train" if stacked else "eval")
        if cache is not None:
            host.update(cache.lookup(host["example_index"]))
        spec = PartitionSpec(None, BATCH_AXES) if stacked else PartitionSpec(BATCH_AXES)
        sharding = NamedSharding(self.mesh, spec)
        axis = 1 if stacked else 0
        count = self.train_loader.shard_count
        out = {}
        for key in DEVICE_KEYS:
            if key not in host:
                continue
            value = np.asarray(host[key])
            shape = list(value.shape)
            shape[axis] *= count
            out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
        return out


def run_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
    """The mesh; a fully specified mesh smaller than the machine uses the first devices."""
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    devices = None
    if -1 not in sizes and math.prod(sizes) < jax.device_count() and jax.process_count() == 1:
        devices = jax.devices()[: math.prod(sizes)]
    try:
        return parallel.make_mesh(mesh_config, devices=devices)
    except ValueError as e:
        raise RunError(f"mesh: {e}") from None


def _resolve_inputs(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> ml_collections.ConfigDict:
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
            ensure_tiny_model(
                config.model.path, config.model.tiny, max_position=max(config.data.buckets),
                seed=config.seed, corpus=corpus,
            )
        parallel.barrier("tiny-model")
    if not os.path.isfile(os.path.join(config.model.path, "config.json")):
        raise RunError(
            f"model.path {config.model.path!r} holds no config.json (a Hugging Face checkpoint directory is "
            "expected; set model.create_if_missing=True to write a tiny random model there)"
        )
    return config


def _total_steps(config: ml_collections.ConfigDict, train_loader: Loader, accum: int) -> int:
    if config.steps > 0:
        return config.steps
    per_epoch = train_loader.batches_in_epoch(0) / accum
    return max(1, math.ceil(config.epochs * per_epoch))


def _load_model(config: ml_collections.ConfigDict, path: str, mesh: Mesh) -> nnx.Module:
    try:
        return models.from_pretrained(
            path,
            dtype=jnp.dtype(config.model.dtype),
            param_dtype=jnp.dtype(config.model.param_dtype),
            sharding_fn=parallel.sharding_fn(mesh),
            remat=config.model.remat,
        )
    except (FileNotFoundError, models.CheckpointError, models.UnsupportedModelError) as e:
        raise RunError(f"loading {path}: {e}") from None


def _with_calibration_samples(
    config: ml_collections.ConfigDict, workdir: str, loaders: dict[str, Loader | None], tokenizer: Any,
    reference: tuple[nnx.GraphDef, Any], is_main: bool,
) -> dict[str, Loader | None]:
    """VPO ``reference_samples``: each example gets a sampled calibration sequence (cached)."""
    model = nnx.merge(*reference)
    encoder_eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else encoder_eos
    cache_dir = config.reference.cache_dir or os.path.join(workdir, "reference_cache")
    common = {
        "params": ref_cache.params_digest(reference[1]),
        "tokenizer": ref_cache.tokenizer_digest(tokenizer),
        "max_new_tokens": config.loss.vpo_max_new_tokens,
        "max_length": config.data.max_length,
        "seed": config.seed,
    }
    out: dict[str, Loader | None] = {}
    for split, loader in loaders.items():
        if loader is None:
            out[split] = None
            continue
        key = calibration.calibration_fingerprint(examples=loader.fingerprint, split=split, **common)

        def sample(loader=loader, split=split) -> list[np.ndarray]:
            return calibration.sample_calibration(
                model, loader.examples, eos_id=encoder_eos, pad_id=pad_id,
                max_new_tokens=config.loss.vpo_max_new_tokens, max_length=config.data.max_length,
                seed=config.seed + (split == "eval"),
            )

        samples = calibration.load_or_sample(os.path.join(cache_dir, f"calibration-{key}.npz"), sample, write=is_main)
        parallel.barrier(f"calibration-{split}")
        out[split] = loader.with_examples(calibration.attach_samples(loader.examples, samples))
    return out


CACHE_BATCH_FACTOR = 4  # reference.cache_batch_size = 0: this many times the loader's batch


def _cache_batch_size(config: ml_collections.ConfigDict, loader: Loader, mesh: Mesh) -> int:
    """Pairs per global batch of the cache pass: ``reference.cache_batch_size``, or
    ``CACHE_BATCH_FACTOR`` times the loader's batch; a multiple of the data shards and the
    mesh's batch axes."""
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    multiple = math.lcm(loader.shard_count, blocks)
    size = config.reference.cache_batch_size or CACHE_BATCH_FACTOR * loader.batch_size
    if size % multiple:
        raise RunError(
            f"reference.cache_batch_size = {size} must be a multiple of {multiple} (the batch is split over "
            f"{loader.shard_count} data shard(s) and the mesh's batch axes data*fsdp = {blocks})"
        )
    return size


def _batch_devices(mesh: Mesh) -> int:
    """How many devices split a batch's rows: the mesh's ``data * fsdp``."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _local_batch_devices(mesh: Mesh, shard_count: int) -> int:
    """How many devices split one process's rows: ``_batch_devices`` over the data shards."""
    return max(1, _batch_devices(mesh) // shard_count)


def _cache_loader(loader: Loader, batch_size: int) -> Loader:
    """One unshuffled pass over a loader's examples in its layout, ``batch_size`` pairs per batch.

    Packed (``loader.packing``): rows of the loader's ``pack_length``, at most as many as the
    loader's rule gives for ``batch_size`` pairs (``Loader.default_pack_rows``, in multiples of
    the loader's ``row_multiple`` so that the rows split over the mesh). Padded: the examples
    sorted by length, so that each batch pads to the smallest bucket that fits similar
    lengths. The order does not matter: the sums are keyed by ``example_index``.
    """
    examples = loader.examples
    if not loader.packing:
        examples = sorted(examples, key=lambda e: max(len(s) for s in e.sequences))
    return loader.with_examples(examples, batch_size=batch_size, shuffle=False, num_epochs=1)


def _reference_caches(
    config: ml_collections.ConfigDict, workdir: str, run_pieces: dict[str, Any], reference: tuple[Any, Any],
    mesh: Mesh, is_main: bool,
) -> dict[str, ref_cache.ReferenceCache]:
    """Loads or computes the precomputed reference log-probs of the train and eval examples."""
    from tqdm.auto import tqdm

    graphdef, params = reference
    reference_fn = make_reference_fn(
        graphdef=graphdef, sequences_per_pair=run_pieces["sequences_per_pair"], logits_chunk=config.model.logits_chunk,
        row_groups=_batch_devices(mesh),
    )
    tokenizer = run_pieces["tokenizer"]
    cache_dir = config.reference.cache_dir or os.path.join(workdir, "reference_cache")
    common = {
        "params": ref_cache.params_digest(params),
        "tokenizer": ref_cache.tokenizer_digest(tokenizer),
    }
    settings = {
        "max_length": config.data.max_length,
        "max_prompt_length": config.data.max_prompt_length,
        "mask": mask_for_loss(config.loss.name),
        "dtype": config.model.dtype,
        "format": config.data.format,
    }

    def sums(batch: dict[str, np.ndarray]) -> jax.Array:
        keys = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask")
        return reference_fn(params, parallel.global_batch({k: batch[k] for k in keys}, mesh))

    caches = {}
    for split, loader, spec in (
        ("train", run_pieces["train"], config.data.train),
        ("eval", run_pieces["eval"], config.data.eval or config.data.train),
    ):
        if loader is None:
            continue
        files = resolve_source(spec)
        key = ref_cache.reference_fingerprint(
            data=ref_cache.source_digest(files), examples=loader.fingerprint,
            settings={**settings, "split": split}, **common,
        )
        batch_size = _cache_batch_size(config, loader, mesh)

        def compute(loader=loader, batch_size=batch_size, split=split) -> ref_cache.ReferenceCache:
            passes = _cache_loader(loader, batch_size)
            bar = tqdm(
                passes, total=passes.batches_in_epoch(0), desc=f"reference cache ({split})", unit="batch",
                dynamic_ncols=True, disable=not (is_main and config.progress_bar),
            )
            return ref_cache.compute_cache(bar, sums)

        expected = np.asarray([e.index for e in loader.examples], np.int64)
        try:
            caches[split], _ = ref_cache.load_or_compute(cache_dir, key, compute, write=is_main, expected=expected)
        except ref_cache.CoverageError as e:
            raise RunError(f"reference.mode = 'precomputed' ({split} examples): {e}") from None
    return caches


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Assembles a run from a validated config (see module docstring)."""
    validate(config)
    parallel.initialize_distributed(config.distributed)
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    mesh = run_mesh(config.mesh)
    resolved = _resolve_inputs(config, workdir, is_main)
    tokenizer = load_tokenizer(resolved.model.tokenizer or resolved.model.path)
    shard = parallel.data_shard(mesh)
    try:
        loaders = build_loaders_from_config(resolved, tokenizer, shard_index=shard.index, shard_count=shard.count,
                                            row_multiple=_local_batch_devices(mesh, shard.count))
    except ValueError as e:
        raise RunError(f"data: {e}") from None
    accum = grad_accum_steps(resolved)
    total_steps = _total_steps(resolved, loaders.train, accum)

    objective = make_objective(resolved.loss, resolved.reference.mode)
    model = _load_model(resolved, resolved.model.path, mesh)
    graphdef, model_params = nnx.split(model, nnx.Param)
    params: dict[str, Any] = {"model": model_params}
    if objective.kind == "reward":
        params["head"] = init_reward_head(model.config.hidden_size, resolved.seed)

    reference_params, reference_graphdef, reference_config, caches = None, graphdef, model.config, {}
    train_loader, eval_loader = loaders.train, loaders.eval
    if objective.uses_reference or objective.sequences_per_pair == 3:
        if resolved.reference.path and os.path.abspath(resolved.reference.path) != os.path.abspath(resolved.model.path):
            reference_model = _load_model(resolved, resolved.reference.path, mesh)
            reference_config = reference_model.config
            reference_graphdef, reference_params = nnx.split(reference_model, nnx.Param)
            del reference_model
        else:
            reference_params = jax.tree.map(jnp.copy, model_params)
        if objective.sequences_per_pair == 3:
            sampled = _with_calibration_samples(
                resolved, workdir, {"train": train_loader, "eval": eval_loader}, tokenizer,
                (reference_graphdef, reference_params), is_main,
            )
            train_loader, eval_loader = sampled["train"], sampled["eval"]
        if resolved.reference.mode == "precomputed":
            caches = _reference_caches(
                resolved, workdir,
                {"tokenizer": tokenizer, "train": train_loader, "eval": eval_loader,
                 "sequences_per_pair": objective.sequences_per_pair},
                (reference_graphdef, reference_params), mesh, is_main,
            )
        if resolved.reference.mode != "frozen":
            reference_params = None

    optimizer, schedule = make_optimizer(resolved.optimizer, total_steps)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, resolved.seed), params)
    state_shardings = parallel.param_shardings(abstract, mesh)
    # The loaded parameters are donated to the state (no second copy of the model in memory).
    state = jax.jit(
        lambda p: init_state(p, optimizer, resolved.seed), out_shardings=state_shardings, donate_argnums=0
    )(params)
    reference_in_step = objective.uses_reference and resolved.reference.mode == "frozen"
    flops = flops_per_token(model.config, reference_config if reference_in_step else None)
    del model, model_params, params
    common = dict(
        graphdef=graphdef, objective=objective, reference_mode=resolved.reference.mode,
        reference_graphdef=reference_graphdef, logits_chunk=resolved.model.logits_chunk,
        row_groups=_batch_devices(mesh),
    )
    train_step = make_train_step(
        optimizer=optimizer, schedule=schedule, state_shardings=state_shardings,
        batch_sharding=NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)),
        max_consecutive_nonfinite=resolved.max_consecutive_nonfinite,
        nan_at_steps=tuple(resolved.debug.nan_at_steps), **common,
    )
    eval_step = make_eval_step(**common)
    return Run(
        config=resolved, workdir=workdir, mesh=mesh, tokenizer=tokenizer, train_loader=train_loader,
        eval_loader=eval_loader, data_summary=loaders.report.summary(), graphdef=graphdef, state=state,
        reference_params=reference_params, objective=objective, optimizer=optimizer, train_step=train_step,
        eval_step=eval_step, total_steps=total_steps, accum=accum, reference_caches=caches, is_main=is_main,
        eval_start=eval_loader.get_state() if eval_loader is not None else None, flops_per_token=flops,
        peak_flops=peak_flops(resolved.peak_flops_per_device, mesh.local_devices, resolved.model.dtype),
    )
