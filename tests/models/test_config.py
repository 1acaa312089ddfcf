"""ModelConfig <-> transformers config mapping, and clear errors for unsupported options."""

import json

import jax.numpy as jnp
import pytest
import transformers

from jaxalign.models import ModelConfig, RopeScaling, UnsupportedModelError, from_hf_config, load_config, to_hf_config
from jaxalign.models.tiny import tiny_config

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("cfg", [
    tiny_config("llama", vocab_size=64, rope_scaling="llama3", attention_bias=True, tie_embeddings=True),
    tiny_config("llama", vocab_size=64, rope_scaling="linear", eos_token_id=3),
    tiny_config("qwen2", vocab_size=64, num_kv_heads=1),
    tiny_config("mistral", vocab_size=64, sliding_window=16),
    tiny_config("gpt2", vocab_size=64, tie_embeddings=False, bos_token_id=0, eos_token_id=1),
], ids=["llama3_bias_tied", "linear", "qwen2", "mistral", "gpt2"])
def test_hf_config_round_trip(cfg, tmp_path):
    hf = to_hf_config(cfg)
    assert hf.architectures == [cfg.hf_architecture]
    assert from_hf_config(hf) == cfg
    hf.save_pretrained(tmp_path)  # through config.json and AutoConfig too
    assert load_config(tmp_path) == cfg


def test_llama3_fields_and_legacy_rope_scaling(tmp_path):
    raw = dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"],
               rope_theta=500000.0, tie_word_embeddings=True, eos_token_id=[2, 3],
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path, dtype=jnp.bfloat16, remat="full")
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.tie_embeddings, cfg.eos_token_id) == (2, 8, True, (2, 3))
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32 and cfg.remat == "full"


def test_family_specific_fields():
    qwen = from_hf_config(transformers.Qwen2Config(**SMALL))
    assert (qwen.attention_bias, qwen.attention_out_bias, qwen.mlp_bias) == (True, False, False)
    mistral = from_hf_config(transformers.MistralConfig(head_dim=16, sliding_window=7, **SMALL))
    assert (mistral.head_dim, mistral.sliding_window) == (16, 7)
    gpt2 = from_hf_config(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=40))
    assert (gpt2.intermediate_size, gpt2.max_position, gpt2.activation, gpt2.tie_embeddings) == (128, 40, "gelu_new", True)


@pytest.mark.parametrize("hf, match", [
    (lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=8, **SMALL), "use_sliding_window=True"),
    (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx=True"),
    (lambda: transformers.LlamaConfig(hidden_act="gelu_fast", **SMALL), "activation='gelu_fast'"),
    (lambda: transformers.LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                                      **SMALL), "rope_type='dynamic'"),
    (lambda: transformers.BertConfig(), "model_type='bert'"),
], ids=["qwen2_sliding", "gpt2_layer_idx_scaling", "activation", "dynamic_rope", "bert"])
def test_unsupported_options_are_named(hf, match):
    with pytest.raises(UnsupportedModelError, match=match):
        from_hf_config(hf(), source="ckpt/config.json")


def test_inconsistent_hf_config_names_its_source():
    with pytest.raises(ValueError, match=r"^ckpt/config\.json: ModelConfig\.num_heads \(4\) must be a multiple"):
        from_hf_config(transformers.Qwen2Config(**{**SMALL, "num_key_value_heads": 32}), source="ckpt/config.json")


def test_invalid_model_configs():
    base = dict(family="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                intermediate_size=8, max_position=8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3, "num_heads": 4})
    with pytest.raises(ValueError, match="remat must be one of"):
        ModelConfig(**base, remat="sometimes")
    with pytest.raises(UnsupportedModelError, match="'mistral' cannot have"):
        ModelConfig(**{**base, "family": "mistral"}, attention_bias=True, attention_out_bias=True)
    with pytest.raises(UnsupportedModelError, match="only supported for family 'mistral'"):
        ModelConfig(**base, sliding_window=4)
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        ModelConfig(**{**base, "vocab_size": 0})
