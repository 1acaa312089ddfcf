"""A tiny Llama-shaped NNX decoder block + one AdamW train step, for the parallel tests.

Shared by the in-process tests and the multi-process worker (mp_worker.py). Parameters carry
the models' logical axis names so the rule table places them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP = 64, 32, 4, 2, 8, 64
ROWS, LENGTH = 8, 16
OPTIMIZER = optax.adamw(1e-2, eps=1e-4)  # eps >> summation-order noise: keeps Adam's first step smooth in g


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], scale: float = 0.2) -> nnx.Param:
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape), out_sharding=axes)


class ToyDecoder(nnx.Module):
    """Embedding, one GQA causal attention + SwiGLU MLP block with RMSNorms, untied unembedding."""

    def __init__(self, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (VOCAB, EMBED), ("vocab", "embed"), 1.0)
        self.q = _param(rngs, (EMBED, HEADS, HEAD_DIM), ("embed", "heads", "head_dim"))
        self.k = _param(rngs, (EMBED, KV_HEADS, HEAD_DIM), ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, (EMBED, KV_HEADS, HEAD_DIM), ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, (HEADS, HEAD_DIM, EMBED), ("heads", "head_dim", "embed"))
        self.attn_norm = nnx.Param(jnp.ones((EMBED,)), out_sharding=("norm",))
        self.mlp_norm = nnx.Param(jnp.ones((EMBED,)), out_sharding=("norm",))
        self.gate = _param(rngs, (EMBED, MLP), ("embed", "mlp"))
        self.up = _param(rngs, (EMBED, MLP), ("embed", "mlp"))
        self.down = _param(rngs, (MLP, EMBED), ("mlp", "embed"))
        self.final_norm = nnx.Param(jnp.ones((EMBED,)), out_sharding=("norm",))
        self.unembed = _param(rngs, (EMBED, VOCAB), ("embed", "vocab"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        def rms(x, w):
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w[...]

        x = self.embedding[...][ids]
        h = rms(x, self.attn_norm)
        q = jnp.einsum("bld,dhk->blhk", h, self.q[...])
        k = jnp.repeat(jnp.einsum("bld,dhk->blhk", h, self.k[...]), HEADS // KV_HEADS, axis=2)
        v = jnp.repeat(jnp.einsum("bld,dhk->blhk", h, self.v[...]), HEADS // KV_HEADS, axis=2)
        scores = jnp.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(HEAD_DIM)
        causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqt,bthk->bqhk", probs, v)
        x = x + jnp.einsum("bqhk,hkd->bqd", attended, self.o[...])
        h = rms(x, self.mlp_norm)
        x = x + (jax.nn.silu(h @ self.gate[...]) * (h @ self.up[...])) @ self.down[...]
        return rms(x, self.final_norm) @ self.unembed[...]


def make_model() -> ToyDecoder:
    """Unsharded creation (placement is the rule table's job, not Flax's eager sharding)."""
    with nnx.use_eager_sharding(False):
        return ToyDecoder(nnx.Rngs(0))


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (ROWS, LENGTH)).astype(np.int32)
    mask = (rng.random((ROWS, LENGTH)) < 0.8).astype(np.float32)
    mask[:, 0] = 0.0
    return {"input_ids": ids, "loss_mask": mask}


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]) -> jax.Array:
    """Masked mean next-token cross-entropy (label-aligned: logits[t-1] score token t)."""
    logits = nnx.merge(graphdef, params)(batch["input_ids"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    token = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    return -jnp.sum(token * mask) / jnp.sum(mask)


def make_step(graphdef: nnx.GraphDef):
    """``(params, opt_state, batch) -> (params, opt_state, loss, grads)``: one AdamW step."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, batch)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


def train(mesh: jax.sharding.Mesh, steps: int = 3) -> dict[str, object]:
    """Runs ``steps`` sharded AdamW steps on ``mesh``; each process feeds only its own rows.

    Returns host numpy copies (gathered over processes): per-step losses, the first step's
    gradients and the final parameters, as pure dicts.
    """
    from jax.experimental import multihost_utils

    from jaxalign import parallel

    model = parallel.create_sharded(make_model, mesh)
    graphdef, params = nnx.split(model)
    params_sh = parallel.param_shardings(params, mesh)
    opt_sh = parallel.param_shardings(jax.eval_shape(OPTIMIZER.init, params), mesh)
    opt_state = jax.jit(OPTIMIZER.init, out_shardings=opt_sh)(params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(
        make_step(graphdef),
        in_shardings=(params_sh, opt_sh, parallel.batch_sharding(mesh)),
        out_shardings=(params_sh, opt_sh, replicated, params_sh),
    )
    shard = parallel.data_shard(mesh)
    rows = ROWS // shard.count
    losses, first_grads = [], None
    for s in range(steps):
        local = {k: v[shard.index * rows : (shard.index + 1) * rows] for k, v in make_batch(s).items()}
        params, opt_state, loss, grads = step(params, opt_state, parallel.global_batch(local, mesh))
        losses.append(float(loss))
        first_grads = grads if first_grads is None else first_grads

    def host(state: nnx.State) -> dict:
        return jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), nnx.to_pure_dict(state)
        )

    return {"losses": np.array(losses), "grads": host(first_grads), "params": host(params)}
