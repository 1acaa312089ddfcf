"""Tiny random decoders shared by the model tests (built once per module)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config

VOCAB = 64

TINY_CONFIGS = {
    # GQA with llama3 RoPE scaling, untied.
    "llama": dict(family="llama", hidden_size=32, num_heads=4, num_kv_heads=2, rope_scaling="llama3",
                  max_position=64),
    # Learned absolute positions: a wrong position derivation breaks invariance.
    "gpt2": dict(family="gpt2", hidden_size=32, num_heads=4, max_position=64, tie_embeddings=True),
    # Sliding window shorter than the sequences.
    "mistral": dict(family="mistral", hidden_size=32, num_heads=4, num_kv_heads=1, sliding_window=3,
                    max_position=64),
}


def tiny_model(name: str, seed: int = 0, *, scan: bool = False, remat: str = "none", **overrides):
    """``scan``: layers stacked and scanned (the same weights as unrolled for the same seed)."""
    options = {k: v for k, v in TINY_CONFIGS[name].items() if k != "family"}
    options.update(overrides)
    config = tiny_config(TINY_CONFIGS[name]["family"], vocab_size=VOCAB, **options)
    return make_model(config.replace(scan_layers=scan, remat=remat), seed=seed)


def label_logps(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """``out[b, t] = log p(ids[b, t + 1] | ids[b, :t + 1])`` from float32 logits ``[B, L, V]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def jitted(model):
    """``model(ids, mask, positions=, segment_ids=)`` as one compiled function per input shape
    (much faster on CPU than op-by-op eager execution)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids, mask, positions, segment_ids):
        return nnx.merge(graphdef, params)(ids, mask, positions=positions, segment_ids=segment_ids)

    return lambda ids, mask=None, *, positions=None, segment_ids=None: forward(
        params, ids, mask, positions, segment_ids)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def family_model(request):
    model = tiny_model(request.param)
    return request.param, model, jitted(model)


@pytest.fixture(scope="session")
def make_tiny():
    return tiny_model


@pytest.fixture(scope="session")
def logps_of():
    return jax.jit(label_logps)


@pytest.fixture(scope="session")
def jit_model():
    return jitted
