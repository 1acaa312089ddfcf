"""Logit parity with transformers' PyTorch models on tiny random checkpoints, and the round trip
HF -> jaxalign -> export -> transformers.

Both sides agree to ~2e-6 (each is ~2e-6 from a float64 torch forward). The torch side runs on
one thread with deterministic algorithms (``_deterministic_torch``) so that its float32
reduction order does not depend on the thread count or on what ran before in the session.
The JAX side cannot be pinned the same way from inside the process (XLA:CPU's intra-op
thread pool is sized when the backend starts); measured, it is bit-identical from run to run
here. A failure reports both sides' distance from the float64 forward, to tell which drifted.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (the 'parity' extra)")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxalign.models import from_pretrained, save_pretrained  # noqa: E402

pytestmark = pytest.mark.parity

V = 96
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)

VARIANTS = {
    "llama_gqa_llama3_rope": lambda: transformers.LlamaConfig(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, **SMALL),
    "llama_bias_tied_linear_rope": lambda: transformers.LlamaConfig(
        num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, **SMALL),
    "qwen2_bias_gqa": lambda: transformers.Qwen2Config(num_key_value_heads=2, **SMALL),
    "qwen2_tied": lambda: transformers.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **SMALL),
    "mistral_sliding_window": lambda: transformers.MistralConfig(num_key_value_heads=2, head_dim=16,
                                                                  sliding_window=4, **SMALL),
    "gpt2_tied": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt2_untied": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   tie_word_embeddings=False),
}


@pytest.fixture(scope="module", autouse=True)
def _deterministic_torch():
    """Torch on one thread with deterministic algorithms for this module; restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)


def _batch(padding_side: str):
    """Rows of 10 tokens with 0, 3 and 6 padding tokens on ``padding_side``."""
    rng = np.random.RandomState(1)
    ids = rng.randint(0, V, (3, 10))
    mask = np.ones((3, 10), np.int64)
    for row, pad in enumerate((0, 3, 6)):
        if pad:
            mask[row, :pad] = 0 if padding_side == "left" else 1
            if padding_side == "right":
                mask[row, -pad:] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    # Positions restart at the first real token (HF defaults to arange, which is wrong for
    # left-padded GPT-2); our model derives the same positions from the mask.
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """A random HF model (norms and biases perturbed too) saved as safetensors, and our load of it."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(VARIANTS[request.param]()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, from_pretrained(path)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_transformers(checkpoint, padding_side):
    name, hf, _, ours = checkpoint
    ids, mask = _batch(padding_side)
    expected = _hf_logits(hf, ids, mask)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == expected.shape == (3, 10, V)
    diff = np.abs(got - expected)[mask == 1].max()
    print(f"{name}-{padding_side}: max |logit diff| {diff:.3g}")  # shown by pytest -s / -rP
    if diff > 1e-4:
        exact = _hf_logits(copy.deepcopy(hf).double(), ids, mask)
        pytest.fail(f"{name}: max |logit diff| {diff}; from a float64 torch forward: ours "
                    f"{np.abs(got - exact)[mask == 1].max():.3g}, torch float32 "
                    f"{np.abs(expected - exact)[mask == 1].max():.3g} ({torch.get_num_threads()} threads)")
    # Sanity: the comparison is not vacuous (logits vary across tokens).
    assert np.abs(expected[mask == 1]).max() > 1e-2


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
    name, hf, _, ours = checkpoint
    out = save_pretrained(ours, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(hf).__name__
    ids, mask = _batch("left")
    np.testing.assert_allclose(_hf_logits(reloaded, ids, mask), _hf_logits(hf, ids, mask), rtol=0, atol=1e-6)
    # And our own loader reads our export back identically.
    again = from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))),
                                  np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))))
