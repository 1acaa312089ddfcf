"""``ModelConfig``: the hyperparameters of our decoders, and their mapping to and from HF configs.

Supported Hugging Face ``model_type`` values: ``llama`` (Llama 2/3), ``qwen2`` (Qwen2/2.5),
``mistral`` and ``gpt2``. Anything else, or an option our decoders do not implement (other RoPE
types, Qwen2 sliding-window layers, GPT-2 cross-attention, ...), raises
``UnsupportedModelError`` naming the option and its value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.models.errors import UnsupportedModelError

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
SCAN_MIN_LAYERS = 4  # ``scan_layers=None`` (auto) stacks and scans the layers of models at least this deep

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_parameters``).

    ``linear``: every frequency divided by ``factor``. ``llama3``: wavelengths longer than
    ``original_max_position / low_freq_factor`` divided by ``factor``, shorter than
    ``original_max_position / high_freq_factor`` kept, and smoothly interpolated between.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported (supported: 'linear', 'llama3')"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyperparameters. ``family`` is the HF ``model_type`` the weights follow.

    ``attention_bias`` puts biases on the q, k, v projections, ``attention_out_bias`` on the
    output projection (Llama's ``attention_bias`` sets both, Qwen2 has only the first, GPT-2
    both). ``sliding_window``: a query at position p sees keys at positions > p - window
    (Mistral). ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. ``remat`` is
    the per-layer rematerialisation policy, one of ``REMAT_POLICIES``. ``query_block``: queries
    per attention block in forwards without a KV cache (0 = one full score matrix; see
    ``attention.dot_product_attention``). ``dtype``, ``param_dtype``, ``remat`` and
    ``query_block`` choose how the model runs, not what it computes: they are not exported.
    ``scan_layers`` (also not exported) stores each block parameter stacked over the layers
    (``[layers, ...]``, logical axis ``layers``) and runs the blocks with ``jax.lax.scan``:
    compile time independent of depth, same results as the unrolled ``nnx.List`` of blocks.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    norm_eps: float = 1e-6
    activation: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    query_block: int = 128
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", _as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype, "param_dtype"))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"family {self.family!r} is not supported (supported: {FAMILIES})")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {self.activation!r} is not supported (supported: {ACTIVATIONS})")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        if not isinstance(self.query_block, int) or self.query_block < 0:
            raise ValueError(f"ModelConfig.query_block must be an int >= 0, got {self.query_block!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive or None, got {self.sliding_window}")
        self._check_family_options()

    def _check_family_options(self):
        """Options each family can express in its HF config (so export is always faithful)."""
        f = self.family
        flags = (self.attention_bias, self.attention_out_bias, self.mlp_bias)
        allowed = {
            "llama": self.attention_bias == self.attention_out_bias,
            "qwen2": flags == (True, False, False),
            "mistral": flags == (False, False, False),
            "gpt2": flags == (True, True, True),
        }[f]
        if not allowed:
            raise UnsupportedModelError(
                f"family {f!r} cannot have (attention_bias, attention_out_bias, mlp_bias) = {flags}"
            )
        if f == "gpt2":
            if self.num_kv_heads != self.num_heads or self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError("gpt2 needs num_kv_heads == num_heads and head_dim * num_heads == hidden_size")
            if self.rope_scaling is not None:
                raise UnsupportedModelError("gpt2 has learned positions: rope_scaling must be None")
        if self.sliding_window is not None and f != "mistral":
            raise UnsupportedModelError(f"sliding_window is only supported for family 'mistral', not {f!r}")

    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def hf_architecture(self) -> str:
        return _HF_ARCHITECTURES[self.family]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _as_dtype(value, field: str) -> jnp.dtype:
    try:
        return jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"ModelConfig.{field}: {value!r} is not a dtype") from e


def _get(hf, name: str, default=None):
    value = getattr(hf, name, default)
    return default if value is None else value


def _unsupported(source: str, option: str, value, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{source}: {option}={value!r} is not supported ({why})")


def _rope_from_hf(hf, source: str) -> tuple[float, RopeScaling | None]:
    params = dict(_get(hf, "rope_parameters", {}) or {})
    legacy = _get(hf, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    theta = float(params.get("rope_theta", _get(hf, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _unsupported(source, "rope_parameters.rope_type", rope_type, f"supported: {ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _unsupported(source, "partial_rotary_factor", partial, "only full rotary embeddings")
    if rope_type == "default":
        return theta, None
    try:
        if rope_type == "linear":
            return theta, RopeScaling("linear", float(params["factor"]))
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise UnsupportedModelError(f"{source}: rope_parameters of type {rope_type!r} lacks {e.args[0]!r}") from e


def _check_full_attention_layers(hf, source: str):
    layer_types = _get(hf, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types))
        raise _unsupported(source, "layer_types", kinds, "only full attention layers")


def from_hf_config(
    hf, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none", source: str = "config"
) -> ModelConfig:
    """Map a ``transformers`` config (Llama, Qwen2, Mistral, GPT-2) to a ``ModelConfig``.

    ``source`` names where the config came from (e.g. the config.json path) in error messages.
    """
    try:
        return _from_hf_config(hf, dtype=dtype, param_dtype=param_dtype, remat=remat, source=source)
    except (UnsupportedModelError, ValueError) as e:
        if str(e).startswith(source):
            raise
        raise type(e)(f"{source}: {e}") from e


def _from_hf_config(hf, *, dtype, param_dtype, remat: str, source: str) -> ModelConfig:
    model_type = getattr(hf, "model_type", None)
    if model_type not in FAMILIES:
        arch = getattr(hf, "architectures", None)
        raise UnsupportedModelError(
            f"{source}: model_type={model_type!r} (architectures={arch}) is not supported; "
            f"supported model types: {FAMILIES}"
        )
    tokens = dict(
        bos_token_id=_get(hf, "bos_token_id"),
        eos_token_id=_get(hf, "eos_token_id"),
        pad_token_id=_get(hf, "pad_token_id"),
    )
    common = dict(dtype=dtype, param_dtype=param_dtype, remat=remat,
                  tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)), **tokens)
    if model_type == "gpt2":
        if not _get(hf, "scale_attn_weights", True):
            raise _unsupported(source, "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
        for option in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if _get(hf, option, False):
                raise _unsupported(source, option, True, "not implemented")
        hidden, heads = hf.n_embd, hf.n_head
        if hidden % heads:
            raise UnsupportedModelError(f"{source}: n_embd={hidden} is not a multiple of n_head={heads}")
        return ModelConfig(
            family="gpt2", vocab_size=hf.vocab_size, hidden_size=hidden, num_layers=hf.n_layer,
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=_get(hf, "n_inner", 4 * hidden), max_position=hf.n_positions,
            norm_eps=float(hf.layer_norm_epsilon), activation=_checked_activation(hf.activation_function, source),
            attention_bias=True, attention_out_bias=True, mlp_bias=True, **common,
        )

    _check_full_attention_layers(hf, source)
    theta, scaling = _rope_from_hf(hf, source)
    heads = hf.num_attention_heads
    attention_bias = bool(_get(hf, "attention_bias", False))
    mlp_bias = bool(_get(hf, "mlp_bias", False))
    sliding_window = None
    if model_type == "qwen2":
        if _get(hf, "use_sliding_window", False):
            raise _unsupported(source, "use_sliding_window", True, "Qwen2 sliding-window layers are not implemented")
        bias_flags = (True, False, False)
    elif model_type == "mistral":
        sliding_window = _get(hf, "sliding_window", None)
        bias_flags = (False, False, False)
    else:
        bias_flags = (attention_bias, attention_bias, mlp_bias)
    return ModelConfig(
        family=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers, num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads", heads),
        head_dim=_get(hf, "head_dim", hf.hidden_size // heads),
        intermediate_size=hf.intermediate_size, max_position=hf.max_position_embeddings,
        norm_eps=float(hf.rms_norm_eps), activation=_checked_activation(hf.hidden_act, source),
        rope_theta=theta, rope_scaling=scaling, attention_bias=bias_flags[0],
        attention_out_bias=bias_flags[1], mlp_bias=bias_flags[2], sliding_window=sliding_window,
        **common,
    )


def _checked_activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise _unsupported(source, "activation", name, f"supported: {ACTIVATIONS}")
    return name


def to_hf_config(cfg: ModelConfig):
    """The ``transformers`` config object (with ``architectures``) describing ``cfg``."""
    import transformers

    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    tokens = dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id)
    common = dict(
        vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
        architectures=[cfg.hf_architecture], dtype=jnp.dtype(cfg.param_dtype).name, **tokens,
    )
    if cfg.is_gpt2:
        return transformers.GPT2Config(
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_positions=cfg.max_position, n_inner=cfg.intermediate_size,
            activation_function=cfg.activation, layer_norm_epsilon=cfg.norm_eps, **common,
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type=s.rope_type, factor=s.factor)
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    llama_like = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act=cfg.activation,
        max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        **common,
    )
    if cfg.family == "llama":
        return transformers.LlamaConfig(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, **llama_like)
    if cfg.family == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **llama_like)
    return transformers.MistralConfig(sliding_window=cfg.sliding_window, **llama_like)


def resolve_scan_layers(scan_layers: bool | None, num_layers: int) -> bool:
    """``scan_layers``, or for ``None`` (auto) whether ``num_layers >= SCAN_MIN_LAYERS``: a
    shallow model compiles fast either way, a deep one only when scanned."""
    return num_layers >= SCAN_MIN_LAYERS if scan_layers is None else bool(scan_layers)


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a ``ModelConfig.remat`` name (``None`` = save nothing)."""
    if name in ("none", "full"):
        return None
    return getattr(jax.checkpoint_policies, name)
