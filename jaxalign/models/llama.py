"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral): pre-norm blocks with RMSNorm, RoPE,
grouped-query attention and a SwiGLU MLP.

Block: ``h = x + o(attn(rmsnorm(x)))``, ``y = h + down(act(gate(rmsnorm(h))) * up(rmsnorm(h)))``.
Parameter paths mirror HF names (``layers.3.self_attn.q_proj.kernel`` <-> ``model.layers.3.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxalign.models.causal_lm import CausalLM, attend
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import KEYS, MLP_HIDDEN, QUERIES, Embed, Initializer, Projection, RMSNorm, activation_fn
from jaxalign.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxalign.models.stacked import make_layers
from jaxalign.parallel.rules import with_logical_constraint


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.q_proj = Projection((d, h, dh), ("embed", "heads", "head_dim"), "bld,dhk->blhk",
                                 n_in=1, bias=cfg.attention_bias, **kw)
        self.k_proj = Projection((d, kv, dh), ("embed", "kv_heads", "head_dim"), "bld,dhk->blhk",
                                 n_in=1, bias=cfg.attention_bias, **kw)
        self.v_proj = Projection((d, kv, dh), ("embed", "kv_heads", "head_dim"), "bld,dhk->blhk",
                                 n_in=1, bias=cfg.attention_bias, **kw)
        self.o_proj = Projection((h, dh, d), ("heads", "head_dim", "embed"), "blhk,hkd->bld",
                                 n_in=2, bias=cfg.attention_out_bias, **kw)
        self.scale = dh ** -0.5
        self.query_block = cfg.query_block

    def __call__(self, x, rope, mask, kv, index):
        q = with_logical_constraint(apply_rope(self.q_proj(x), rope), QUERIES)
        k = with_logical_constraint(apply_rope(self.k_proj(x), rope), KEYS)
        v = with_logical_constraint(self.v_proj(x), KEYS)
        out, kv = attend(q, k, v, mask, kv, index, self.scale, self.query_block)
        return self.o_proj(with_logical_constraint(out, QUERIES)), kv


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(n_in=1, bias=cfg.mlp_bias, init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.gate_proj = Projection((d, f), ("embed", "mlp"), "bld,df->blf", **kw)
        self.up_proj = Projection((d, f), ("embed", "mlp"), "bld,df->blf", **kw)
        self.down_proj = Projection((f, d), ("mlp", "embed"), "blf,fd->bld", **kw)
        self.act = activation_fn(cfg.activation)

    def __call__(self, x):
        return self.down_proj(with_logical_constraint(self.act(self.gate_proj(x)) * self.up_proj(x), MLP_HIDDEN))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        norm = dict(init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **norm)
        self.self_attn = LlamaAttention(cfg, init=init)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **norm)
        self.mlp = LlamaMLP(cfg, init=init)

    def __call__(self, x, rope, mask, kv, index):
        attn, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, *, init: Initializer):
        if cfg.is_gpt2:
            raise ValueError("LlamaForCausalLM got a gpt2 config; use GPT2LMHeadModel")
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), init=init,
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.layers = make_layers(lambda: LlamaBlock(cfg, init=init), cfg.num_layers, cfg.scan_layers)
        self.inv_freq = tuple(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).tolist())
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.lm_head = nnx.data(
            None if cfg.tie_embeddings
            else init((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
        )

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def position_encoding(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_tables(positions, self.inv_freq)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)

    def token_embedding(self) -> jax.Array:
        return self.embed_tokens.embedding[...]
