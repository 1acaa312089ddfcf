"""Sampling many prompts from a model's parameters as the train state holds them.

``sample(graphdef, params, prompts, config, mesh=...)`` returns ``num_samples`` completions per
prompt. The parameters keep their own shardings (data / fsdp / tensor): the decode program
(``jaxalign.sampling.decode``) is compiled for them, nothing is copied or gathered. Prompts are
sorted by length and left-padded into ``config.buckets``, ``config.batch_size`` prompts per
call, so a run compiles one program per bucket it meets; each call's prompt rows are split over
the mesh's ``(data, fsdp)`` axes (a batch is padded with filler prompts to a multiple of them).

Determinism: sample ``s`` of the prompt numbered ``i`` (``prompt_indices``, default its
position) draws its tokens from ``fold_in(fold_in(PRNGKey(seed), i), s)`` (then one
``fold_in`` per step): the same seed gives the same samples whatever the batch size, the other
prompts of the batch, the bucket or the number of devices (up to float rounding of the
layout, which can flip a near-tie). With several processes, each passes its own prompts (with
globally unique ``prompt_indices``); they must call ``sample`` together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.sampling.decode import decode
from jaxalign.sampling.generate import check_settings

__all__ = ["Samples", "SamplingConfig", "sample"]

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``top_k = 0`` and ``top_p = 1`` are off; ``temperature = 0`` is greedy.
    ``stop_ids``: tokens that end a completion (EOS, the chat template's end of turn), kept in
    it. ``batch_size``: prompts per program call over all processes (rows: ``batch_size *
    num_samples``). ``buckets``: the padded prompt lengths."""

    max_new_tokens: int = 128
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    batch_size: int = 16
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)

    def __post_init__(self) -> None:
        check_settings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                       top_k=self.top_k or None)
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.buckets or min(self.buckets) < 1:
            raise ValueError(f"buckets must be positive lengths, got {self.buckets}")


class Samples(NamedTuple):
    """Per prompt (input order) and sample: ``tokens [N, n, T]`` int32 (``pad_id`` after the
    end), ``mask [N, n, T]`` int32, ``logps [N, n, T]`` float32 (the tokens' log-probs under the
    unmodified model; 0 where masked), ``finish [N, n]`` int32 (``FINISH_STOP`` /
    ``FINISH_LENGTH``), with ``T = max_new_tokens``."""

    tokens: np.ndarray
    mask: np.ndarray
    logps: np.ndarray
    finish: np.ndarray


def _program(graphdef, params, ids, mask, index, seed, temperature, top_p, *, num_samples, **static):
    """``decode`` with each row's key from (seed, prompt index, sample index)."""
    base = jax.random.key(seed)
    prompt_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, index)
    keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, jnp.arange(num_samples)))(prompt_keys)
    return decode(graphdef, params, ids, mask, keys.reshape(-1), temperature, top_p, num_samples=num_samples,
                  **static)


_compiled = jax.jit(_program, static_argnames=("graphdef", "max_new_tokens", "num_samples", "top_k", "stop_ids",
                                                "pad_id"))


def _bucket(n: int, buckets: Sequence[int]) -> int:
    fitting = [b for b in sorted(buckets) if b >= n]
    if not fitting:
        raise ValueError(f"a prompt of {n} tokens is longer than the largest bucket {max(buckets)}")
    return fitting[0]


def _plan(lengths: np.ndarray, config: SamplingConfig, per_call: int) -> list[tuple[int, np.ndarray]]:
    """``(bucket, prompt positions)`` per call: prompts sorted by length, grouped by bucket,
    ``per_call`` at a time; with several processes, every process gets the same number of
    calls per bucket (the short ones run filler calls)."""
    order = np.argsort(lengths, kind="stable")
    buckets = np.asarray([_bucket(int(n), config.buckets) for n in lengths[order]])
    plan = []
    for bucket in sorted(set(config.buckets)):
        chosen = order[buckets == bucket]
        calls = -(-len(chosen) // per_call)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            calls = int(np.max(multihost_utils.process_allgather(np.asarray(calls))))
        plan += [(bucket, chosen[k * per_call: (k + 1) * per_call]) for k in range(calls)]
    return plan


def _place(value: np.ndarray, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(value)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    return jax.make_array_from_process_local_data(sharding, value, shape)


def _local(x: jax.Array, mesh: Mesh | None) -> np.ndarray:
    if mesh is None or jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(BATCH_AXES)))


def sample(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[np.ndarray], config: SamplingConfig, *,
           mesh: Mesh | None = None, prompt_indices: Sequence[int] | None = None,
           progress: Callable[[int, int], None] | None = None) -> Samples:
    """``config.num_samples`` completions of each of this process's ``prompts`` (int token ids,
    each non-empty); see the module docstring. ``progress(prompts_done, tokens)`` is
    called after every program call with the prompts done so far and the tokens that call
    generated."""
    n, t = config.num_samples, config.max_new_tokens
    lengths = np.asarray([len(p) for p in prompts], np.int64)
    if len(prompts) and lengths.min() < 1:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
    indices = np.arange(len(prompts)) if prompt_indices is None else np.asarray(prompt_indices, np.int64)
    if indices.shape != lengths.shape:
        raise ValueError(f"{len(indices)} prompt_indices for {len(prompts)} prompts")
    split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    local_split = max(1, split // jax.process_count())
    per_call = -(-max(1, config.batch_size // jax.process_count()) // local_split) * local_split
    out = Samples(np.full((len(prompts), n, t), config.pad_id, np.int32), np.zeros((len(prompts), n, t), np.int32),
                  np.zeros((len(prompts), n, t), np.float32), np.zeros((len(prompts), n), np.int32))
    static = dict(max_new_tokens=t, num_samples=n, top_k=config.top_k or None, stop_ids=tuple(config.stop_ids),
                  pad_id=config.pad_id)
    done_prompts = 0
    for bucket, chosen in _plan(lengths, config, per_call):
        ids = np.full((per_call, bucket), config.pad_id, np.int32)
        mask = np.zeros((per_call, bucket), np.int32)
        ids[:, -1], mask[:, -1] = config.pad_id, 1  # filler rows: one token, results dropped
        index = np.zeros((per_call,), np.int32)
        for row, p in enumerate(chosen):
            ids[row, bucket - lengths[p]:], mask[row, bucket - lengths[p]:] = prompts[p], 1
            index[row] = indices[p]
        result = _compiled(graphdef, params, _place(ids, mesh), _place(mask, mesh), _place(index, mesh),
                           jnp.uint32(config.seed), jnp.float32(config.temperature), jnp.float32(config.top_p),
                           **static)
        tokens, got_mask, logps, finish = (_local(x, mesh) for x in result)
        k = len(chosen)
        out.tokens[chosen] = tokens.reshape(per_call, n, t)[:k]
        out.mask[chosen] = got_mask.reshape(per_call, n, t)[:k]
        out.logps[chosen] = logps.reshape(per_call, n, t)[:k]
        out.finish[chosen] = finish.reshape(per_call, n)[:k]
        done_prompts += k
        if progress is not None:
            progress(done_prompts, int(got_mask.reshape(per_call, n, t)[:k].sum()))
    return out

