"""Generation with a KV cache: greedy equals repeated full-forward argmax, EOS stops rows,
padding side does not matter, and the sampling filters do what they say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.sampling import filter_logits, generate, sample_tokens

V, T, P = 64, 5, 7
PADS = (0, 2, 4)
PAD_ID = 0


def _model(family):
    options = dict(num_kv_heads=2) if family == "llama" else {}
    return make_model(tiny_config(family, vocab_size=V, hidden_size=32, max_position=32, **options), seed=11)


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


def _prompts(side="left"):
    rng = np.random.RandomState(5)
    ids = np.zeros((len(PADS), P), np.int32)
    mask = np.zeros((len(PADS), P), np.int32)
    for row, pad in enumerate(PADS):
        tokens = rng.randint(1, V, P - pad)
        sl = slice(pad, P) if side == "left" else slice(0, P - pad)
        ids[row, sl], mask[row, sl] = tokens, 1
    return ids, mask


def _greedy_reference(model, ids, mask, steps):
    """Append argmax(full forward logits at the last token) ``steps`` times, row by row."""
    graphdef, params = nnx.split(model)
    width = P + steps
    forward = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, m))
    out = []
    for row in range(ids.shape[0]):
        seq = list(ids[row][mask[row] == 1])
        for _ in range(steps):
            buf = np.zeros((1, width), np.int32)
            buf[0, : len(seq)] = seq
            m = (np.arange(width) < len(seq)).astype(np.int32)[None]
            logits = forward(params, jnp.asarray(buf), jnp.asarray(m))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        out.append(seq[-steps:])
    return np.array(out)


@pytest.fixture(scope="module")
def llama_greedy(llama):
    ids, mask = _prompts("left")
    return _greedy_reference(llama, ids, mask, T)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_repeated_full_forward_argmax(family, llama, llama_greedy):
    model = llama if family == "llama" else _model("gpt2")
    ids, mask = _prompts("left")
    expected = llama_greedy if family == "llama" else _greedy_reference(model, ids, mask, T)
    out = generate(model, ids, mask, max_new_tokens=T, temperature=0.0, rng=jax.random.key(0))
    assert out.tokens.shape == out.mask.shape == (3, T) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_array_equal(np.asarray(out.mask), np.ones((3, T)))


def test_right_padded_prompts_generate_the_same(llama, llama_greedy):
    ids, mask = _prompts("right")
    out = generate(llama, ids, mask, max_new_tokens=T, temperature=0.0, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), llama_greedy)


def test_eos_stops_each_row(llama, llama_greedy):
    ids, mask = _prompts("left")
    eos = int(llama_greedy[0, 1])
    out = generate(llama, ids, mask, max_new_tokens=T, temperature=0.0, eos_ids=[eos, V + 5], rng=jax.random.key(0),
                   pad_id=PAD_ID)
    tokens, got_mask = np.asarray(out.tokens), np.asarray(out.mask)
    stopped = 0
    for row in range(3):
        hits = np.flatnonzero(llama_greedy[row] == eos)
        n = hits[0] + 1 if hits.size else T  # the EOS itself is kept
        stopped += hits.size > 0
        np.testing.assert_array_equal(tokens[row, :n], llama_greedy[row, :n])
        np.testing.assert_array_equal(got_mask[row], (np.arange(T) < n).astype(np.int32))
        assert (tokens[row, n:] == PAD_ID).all()
    assert stopped >= 1 and got_mask[0].sum() <= 2


def test_top_k_one_and_tiny_top_p_are_greedy(llama, llama_greedy):
    ids, mask = _prompts("left")
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        out = generate(llama, ids, mask, max_new_tokens=T, temperature=1.0, rng=jax.random.key(7), **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens), llama_greedy, err_msg=str(kw))


def test_sampling_is_reproducible_and_depends_on_the_key(llama):
    ids, mask = _prompts("left")
    runs = [generate(llama, ids, mask, max_new_tokens=T, temperature=1.5, rng=jax.random.key(s)).tokens
            for s in (1, 1, 2)]
    np.testing.assert_array_equal(np.asarray(runs[0]), np.asarray(runs[1]))
    assert (np.asarray(runs[0]) != np.asarray(runs[2])).any()


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.75)) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.75
    assert kept(filter_logits(logits, top_p=0.85)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 4


def test_sample_tokens_follows_the_tempered_distribution():
    n = 40000
    probs = np.array([0.5, 0.3, 0.2])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 3))
    key = jax.random.key(3)

    keys = jax.random.split(key, n)

    def freq(**kw):
        return np.bincount(np.asarray(sample_tokens(logits, keys, **kw)), minlength=3) / n

    np.testing.assert_allclose(freq(temperature=1.0), probs, atol=0.015)
    tempered = probs ** 0.5 / (probs ** 0.5).sum()
    np.testing.assert_allclose(freq(temperature=2.0), tempered, atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_k=2), [0.625, 0.375, 0.0], atol=0.015)
    assert (np.asarray(sample_tokens(logits[:4], keys[:4], temperature=0.0)) == 0).all()


def test_invalid_arguments(llama):
    ids, mask = _prompts("left")
    key = jax.random.key(0)
    for kw, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k")):
        with pytest.raises(ValueError, match=match):
            generate(llama, ids, mask, rng=key, **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="must be equal"):
        generate(llama, ids, mask[:, :-1], max_new_tokens=2, rng=key)
