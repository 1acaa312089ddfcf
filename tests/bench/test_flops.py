"""The 6N FLOP count against hand counts, and the MFU arithmetic."""

import numpy as np
import pytest
from flax import nnx

from jaxalign.perf.flops import (
    attention_flops_per_token,
    mfu,
    param_counts,
    train_flops_per_token,
)
from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config

# hidden 8, 2 layers, 2 heads of 4, 1 kv head, MLP 16, vocab 32.
LLAMA = dict(vocab_size=32, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16)


def test_llama_counts_match_a_hand_count():
    counts = param_counts(tiny_config("llama", **LLAMA))
    # Per layer: q 8*2*4 + k 8*1*4 + v 8*1*4 + o 2*4*8 = 192; gate, up, down 3*8*16 = 384;
    # two RMSNorm scales 2*8 = 16  ->  592. Two layers + final norm 8 = 1192.
    assert counts.blocks == 2 * (192 + 384 + 16) + 8 == 1192
    assert counts.embedding == 32 * 8
    assert counts.unembedding == counts.lm_head_stored == 8 * 32
    assert counts.flop_params == 1192 + 256 == 1448
    assert counts.total == 1192 + 256 + 256


def test_counts_agree_with_the_built_model():
    config = tiny_config("llama", **LLAMA)
    model = make_model(config, seed=0)
    total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert param_counts(config).total == total


def test_tied_gpt2_counts_the_unembedding_matmul_and_excludes_both_embeddings():
    config = tiny_config("gpt2", vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                         max_position=16, tie_embeddings=True)
    counts = param_counts(config)
    # One block: c_attn 8*3*8 + 3*8 = 216; c_proj 8*8 + 8 = 72; ln_1, ln_2 scale+bias 32;
    # c_fc 8*16 + 16 = 144; mlp c_proj 16*8 + 8 = 136  ->  600; ln_f 16  ->  616.
    assert counts.blocks == 616
    assert counts.embedding == 32 * 8 + 16 * 8  # wte + wpe (lookups)
    assert counts.lm_head_stored == 0
    assert counts.flop_params == 616 + 8 * 32


def test_flops_per_token_and_mfu():
    n = 1448
    assert train_flops_per_token(n, reference_on_the_fly=False) == 6 * n
    assert train_flops_per_token(n, reference_on_the_fly=True) == 8 * n
    assert mfu(4e9, 1e10) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0)
    config = tiny_config("llama", **LLAMA)
    # 4 * layers * heads * head_dim * context = 4 * 2 * 2 * 4 * 10
    assert attention_flops_per_token(config, 10) == 640
