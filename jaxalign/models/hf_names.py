"""The correspondence between our parameters and HF checkpoint tensors, one entry per tensor.

HF ``nn.Linear`` weights are ``[out, in]``; ours are input-major with heads split out, e.g.
``q_proj.weight [H*Dh, D]`` -> ``q_proj.kernel [D, H, Dh]`` (transpose, then reshape). GPT-2's
Conv1D weights are already ``[in, out]`` and are only reshaped.

A reward model is written as the family's HF ``*ForSequenceClassification`` checkpoint: the
backbone under the causal LM's names (``model.*``; GPT-2 ``transformer.*``), no ``lm_head``,
and ``score.weight [1, D]`` holding our bias-free head ``{"kernel": [D]}``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxalign.models.config import ModelConfig

Path = tuple[str | int, ...]

SEQUENCE_CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}
SCORE_NAME = "score.weight"
SCORE_PATH: Path = ("score",)
LM_HEAD_PATH: Path = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """Our parameter at ``path`` (shape ``shape``) is HF tensor ``hf_name`` (shape ``hf_shape``).

    ``to_ours(x) = (x.T if transpose else x).reshape(shape)`` and ``to_hf`` is its inverse; both
    return numpy views when they can, so memory-mapped tensors stay lazy.
    ``aliases`` are other names the same tensor has in some checkpoints.
    """

    path: Path
    hf_name: str
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    transpose: bool = False
    aliases: tuple[str, ...] = ()

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.transpose:
            return x.reshape(self.hf_shape[::-1]).T
        return x.reshape(self.hf_shape)


def _linear(path: Path, hf_name: str, shape: tuple[int, ...], n_in: int) -> TensorMapping:
    """A torch Linear weight: HF ``[prod(out dims), prod(in dims)]``."""
    n_out = int(np.prod(shape[n_in:]))
    return TensorMapping(path, hf_name, shape, (n_out, int(np.prod(shape[:n_in]))), transpose=True)


def _plain(path: Path, hf_name: str, shape: tuple[int, ...], hf_shape: tuple[int, ...] | None = None,
           aliases: tuple[str, ...] = ()) -> TensorMapping:
    return TensorMapping(path, hf_name, shape, hf_shape or shape, aliases=aliases)


def tensor_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    """Every parameter of the decoder for ``cfg`` with its HF tensor, in a stable order."""
    return _gpt2_mappings(cfg) if cfg.is_gpt2 else _llama_mappings(cfg)


def is_sequence_classifier(architectures: list[str] | None) -> bool:
    """Whether a config.json's ``architectures`` name an HF sequence-classification model."""
    return any(a.endswith("ForSequenceClassification") for a in architectures or ())


def score_mapping(cfg: ModelConfig) -> TensorMapping:
    """HF ``score.weight [1, D]`` (``Linear(D, 1, bias=False)``) <-> the reward head's kernel
    ``[D]`` (at ``SCORE_PATH``)."""
    return _plain(SCORE_PATH, SCORE_NAME, (cfg.hidden_size,), (1, cfg.hidden_size))


def reward_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    """The tensors of a sequence-classification checkpoint: the backbone (no ``lm_head``), then
    ``score_mapping``."""
    return [*(m for m in tensor_mappings(cfg) if m.path != LM_HEAD_PATH), score_mapping(cfg)]


def _llama_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    d, h, kv, dh, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    out = [_plain(("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d))]
    for i in range(cfg.num_layers):
        ours, hf = ("layers", i), f"model.layers.{i}."
        out.append(_plain(ours + ("input_layernorm", "scale"), hf + "input_layernorm.weight", (d,)))
        for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            p = ours + ("self_attn", name)
            out.append(_linear(p + ("kernel",), hf + f"self_attn.{name}.weight", (d, heads, dh), 1))
            if cfg.attention_bias:
                out.append(_plain(p + ("bias",), hf + f"self_attn.{name}.bias", (heads, dh), (heads * dh,)))
        p = ours + ("self_attn", "o_proj")
        out.append(_linear(p + ("kernel",), hf + "self_attn.o_proj.weight", (h, dh, d), 2))
        if cfg.attention_out_bias:
            out.append(_plain(p + ("bias",), hf + "self_attn.o_proj.bias", (d,)))
        out.append(_plain(ours + ("post_attention_layernorm", "scale"), hf + "post_attention_layernorm.weight", (d,)))
        for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
            p = ours + ("mlp", name)
            out.append(_linear(p + ("kernel",), hf + f"mlp.{name}.weight", shape, 1))
            if cfg.mlp_bias:
                out.append(_plain(p + ("bias",), hf + f"mlp.{name}.bias", shape[1:]))
    out.append(_plain(("norm", "scale"), "model.norm.weight", (d,)))
    if not cfg.tie_embeddings:
        out.append(_linear(LM_HEAD_PATH, "lm_head.weight", (d, v), 1))
    return out


def _gpt2_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    d, h, dh, f, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size

    def t(path: Path, name: str, shape, hf_shape=None) -> TensorMapping:
        # Hub GPT-2 checkpoints store the transformer's tensors without the "transformer." prefix.
        return _plain(path, "transformer." + name, shape, hf_shape, aliases=(name,))

    out = [t(("wte", "embedding"), "wte.weight", (v, d)), t(("wpe", "embedding"), "wpe.weight", (cfg.max_position, d))]
    for i in range(cfg.num_layers):
        ours, hf = ("h", i), f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out.append(t(ours + (ln, "scale"), hf + f"{ln}.weight", (d,)))
            out.append(t(ours + (ln, "bias"), hf + f"{ln}.bias", (d,)))
        out.append(t(ours + ("attn", "c_attn", "kernel"), hf + "attn.c_attn.weight", (d, 3, h, dh), (d, 3 * d)))
        out.append(t(ours + ("attn", "c_attn", "bias"), hf + "attn.c_attn.bias", (3, h, dh), (3 * d,)))
        out.append(t(ours + ("attn", "c_proj", "kernel"), hf + "attn.c_proj.weight", (h, dh, d), (d, d)))
        out.append(t(ours + ("attn", "c_proj", "bias"), hf + "attn.c_proj.bias", (d,)))
        out.append(t(ours + ("mlp", "c_fc", "kernel"), hf + "mlp.c_fc.weight", (d, f)))
        out.append(t(ours + ("mlp", "c_fc", "bias"), hf + "mlp.c_fc.bias", (f,)))
        out.append(t(ours + ("mlp", "c_proj", "kernel"), hf + "mlp.c_proj.weight", (f, d)))
        out.append(t(ours + ("mlp", "c_proj", "bias"), hf + "mlp.c_proj.bias", (d,)))
    out.append(t(("ln_f", "scale"), "ln_f.weight", (d,)))
    out.append(t(("ln_f", "bias"), "ln_f.bias", (d,)))
    if not cfg.tie_embeddings:
        out.append(_linear(LM_HEAD_PATH, "lm_head.weight", (d, v), 1))
    return out
