"""GPT-2 decoder: learned absolute positions, pre-norm LayerNorm blocks, fused QKV, GELU MLP.

Block: ``h = x + c_proj(attn(ln_1(x)))``, ``y = h + mlp.c_proj(gelu(c_fc(ln_2(h))))``.
HF stores ``c_attn`` as a Conv1D ``[D, 3D]`` (input-major) with q, k, v side by side; we keep that
layout, reshaped to ``[D, 3, H, Dh]`` so the head axis can be sharded. Paths mirror HF names
(``h.0.attn.c_attn.kernel`` <-> ``transformer.h.0.attn.c_attn.weight``).
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxalign.models.causal_lm import CausalLM, attend
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import MLP_HIDDEN, QUERIES, Embed, Initializer, LayerNorm, Projection, activation_fn
from jaxalign.models.stacked import make_layers
from jaxalign.parallel.rules import with_logical_constraint


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.c_attn = Projection((d, 3, h, dh), ("embed", None, "heads", "head_dim"), "bld,dthk->blthk",
                                 n_in=1, bias=True, **kw)
        self.c_proj = Projection((h, dh, d), ("heads", "head_dim", "embed"), "blhk,hkd->bld",
                                 n_in=2, bias=True, **kw)
        self.scale = dh ** -0.5
        self.query_block = cfg.query_block

    def __call__(self, x, positions, mask, kv, index):
        qkv = self.c_attn(x)
        q, k, v = (with_logical_constraint(qkv[:, :, i], QUERIES) for i in range(3))
        out, kv = attend(q, k, v, mask, kv, index, self.scale, self.query_block)
        return self.c_proj(with_logical_constraint(out, QUERIES)), kv


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(n_in=1, bias=True, init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.c_fc = Projection((d, f), ("embed", "mlp"), "bld,df->blf", **kw)
        self.c_proj = Projection((f, d), ("mlp", "embed"), "blf,fd->bld", **kw)
        self.act = activation_fn(cfg.activation)

    def __call__(self, x):
        return self.c_proj(with_logical_constraint(self.act(self.c_fc(x)), MLP_HIDDEN))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        norm = dict(init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, **norm)
        self.attn = GPT2Attention(cfg, init=init)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, **norm)
        self.mlp = GPT2MLP(cfg, init=init)

    def __call__(self, x, positions, mask, kv, index):
        attn, kv = self.attn(self.ln_1(x), positions, mask, kv, index)
        x = x + attn
        return x + self.mlp(self.ln_2(x)), kv


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        if not cfg.is_gpt2:
            raise ValueError(f"GPT2LMHeadModel got a {cfg.family!r} config; use LlamaForCausalLM")
        self.config = cfg
        kw = dict(init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.wpe = Embed(cfg.max_position, cfg.hidden_size, (None, "embed"), **kw)
        self.h = make_layers(lambda: GPT2Block(cfg, init=init), cfg.num_layers, cfg.scan_layers)
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.lm_head = nnx.data(
            None if cfg.tie_embeddings
            else init((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
        )

    @property
    def layers(self):
        return self.h

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.wte(input_ids) + self.wpe(positions)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.ln_f(x)

    def token_embedding(self) -> jax.Array:
        return self.wte.embedding[...]
