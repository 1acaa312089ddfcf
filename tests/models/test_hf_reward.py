"""Reward models exported as HF sequence classifiers: transformers loads them and scores what
jaxalign's head scores (``sequence_rewards``) on right-padded rows ending with EOS, the pad id
never being EOS; our loader reads them back exactly."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need torch (the 'parity' extra)")
transformers = pytest.importorskip("transformers")

from jaxalign.data.encoding import Encoder  # noqa: E402
from jaxalign.models import CheckpointError, make_model, save_pretrained  # noqa: E402
from jaxalign.models.hf_import import SINGLE_FILE  # noqa: E402
from jaxalign.models.hf_names import SEQUENCE_CLASSIFIERS  # noqa: E402
from jaxalign.models.hf_reward import REWARD_PAD_TOKEN, load_reward_model  # noqa: E402
from jaxalign.models.safetensors_io import SafetensorsFile  # noqa: E402
from jaxalign.models.tiny import build_tokenizer, round_up, tiny_config  # noqa: E402
from jaxalign.scoring.forward import sequence_rewards  # noqa: E402

pytestmark = pytest.mark.parity

V, D, BOS, EOS, PAD = 96, 32, 0, 1, 2
FAMILIES = {
    "llama": dict(num_kv_heads=2),
    "qwen2": dict(num_kv_heads=2),
    "mistral": dict(num_kv_heads=1, sliding_window=4),
    "gpt2": dict(),
}
CORPUS = ["the cat sat on the mat. hello world, how are you today?", "a dog ran in the park; the sun was warm."] * 10
TEXTS = [("hello", " world, how are you?"), ("the cat", " sat on the mat."), ("a dog ran", " in the park"),
         ("hi", " the sun")]


def _model(family: str, *, vocab_size: int = V, seed: int = 0, **tokens):
    """A tiny decoder whose parameters (norms and biases too) get O(0.3) random values."""
    config = tiny_config(family, vocab_size=vocab_size, hidden_size=D, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position=64, **FAMILIES[family], **tokens)
    model = make_model(config, seed=seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed + 1)
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
                                                   for x in leaves]))
    return model


def _head(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def _random_rows(lengths=(9, 4, 13, 2, 7)) -> list[np.ndarray]:
    """BOS, random tokens (never BOS/EOS/pad), EOS: sequences as the scorer feeds them."""
    rng = np.random.default_rng(3)
    return [np.asarray([BOS, *rng.integers(3, V, n - 2), EOS], np.int32) for n in lengths]


def _padded(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right padding with ``pad_id`` and an attention mask, as HF pads."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _ours(model, head: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """``sequence_rewards`` on the padded layout of the batch contract (row i = sequence i)."""
    ids, mask = _padded(rows, 0)
    batch = {"input_ids": ids.astype(np.int32), "positions": np.maximum(mask.cumsum(1) - 1, 0).astype(np.int32),
             "segment_ids": mask.astype(np.int32), "sequence_ids": np.where(mask == 1, np.arange(len(rows))[:, None], -1)}
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, h, b: sequence_rewards(graphdef, p, h, b, num_sequences=len(rows)))
    return np.asarray(fn(params, {"kernel": jnp.asarray(head)}, {k: jnp.asarray(v) for k, v in batch.items()}))


def _hf_model(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


def _hf(path, rows: list[np.ndarray]) -> tuple[np.ndarray, object]:
    hf = _hf_model(path)
    return _hf_scores(hf, rows), hf


def _hf_scores(hf, rows: list[np.ndarray]) -> np.ndarray:
    pad = hf.config.pad_token_id
    ids, mask = _padded(rows, EOS if pad is None else pad)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert logits.shape == (len(rows), 1)
    return logits[:, 0].numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_loads_as_hf_sequence_classifier_with_equal_scores(family, tmp_path):
    model, head = _model(family, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD), _head()
    out = save_pretrained(model, tmp_path / "rm", reward_head=jnp.asarray(head))
    names = set(SafetensorsFile(out / SINGLE_FILE).keys())
    assert "score.weight" in names and not any("lm_head" in n for n in names)
    rows = _random_rows()
    got, hf = _hf(out, rows)
    assert type(hf).__name__ == SEQUENCE_CLASSIFIERS[family]
    assert hf.config.num_labels == 1 and hf.config.id2label == {0: "LABEL_0"} and hf.config.pad_token_id == PAD
    np.testing.assert_array_equal(hf.score.weight.detach().numpy(), head[None])
    expected = _ours(model, head, rows)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.std(expected) > 0.1  # not vacuous: the rewards differ between rows

    loaded, loaded_head = load_reward_model(out)
    np.testing.assert_array_equal(loaded_head, head)
    assert loaded.config.tie_embeddings and loaded.lm_head is None
    np.testing.assert_array_equal(_ours(loaded, loaded_head, rows), expected)


def _encoded(tokenizer) -> list[np.ndarray]:
    encoder = Encoder(tokenizer)
    return [encoder.encode_sequence(p, c).ids for p, c in TEXTS]


def test_pad_equal_to_eos_gets_a_dedicated_pad_token_in_an_unused_row(tmp_path):
    tok = build_tokenizer("bpe", bpe_vocab_size=300, corpus=CORPUS)
    tok.pad_token = tok.eos_token
    n = len(tok)
    model, head = _model("llama", vocab_size=round_up(n), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), _head(1)
    out = save_pretrained(model, tmp_path / "rm", tokenizer=tok, reward_head=head)
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == n  # the caller's tokenizer is untouched
    rows = _encoded(tok)
    got, hf = _hf(out, rows)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.config.pad_token_id == n == exported.pad_token_id and exported.pad_token == REWARD_PAD_TOKEN
    assert all(np.array_equal(a, b) for a, b in zip(_encoded(exported), rows, strict=True))  # same encoding
    np.testing.assert_allclose(got, _ours(model, head, rows), rtol=0, atol=1e-4)


def test_no_distinct_pad_and_no_free_row_leaves_pad_unset(tmp_path, caplog):
    tok = build_tokenizer("bpe", bpe_vocab_size=300, corpus=CORPUS)
    tok.pad_token = tok.eos_token
    model, head = _model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), _head(2)
    with caplog.at_level(logging.WARNING, logger="jaxalign.models.hf_reward"):
        out = save_pretrained(model, tmp_path / "rm", tokenizer=tok, reward_head=head)
    assert "pad_token_id is null" in caplog.text
    rows, hf = _encoded(tok), _hf_model(out)
    assert hf.config.pad_token_id is None
    # One unpadded sequence at a time: HF reads its last token, the EOS.
    got = np.concatenate([_hf_scores(hf, [row]) for row in rows])
    np.testing.assert_allclose(got, _ours(model, head, rows), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="no padding token"):
        _hf_scores(hf, rows)


def test_wrong_head_shape_and_causal_checkpoint_are_refused(tmp_path):
    model = _model("llama")
    with pytest.raises(ValueError, match=r"reward_head has shape \(1, 32\); expected \(32,\)"):
        save_pretrained(model, tmp_path / "bad", reward_head=np.zeros((1, D), np.float32))
    causal = save_pretrained(model, tmp_path / "causal")
    with pytest.raises(CheckpointError, match="not a sequence-classification model"):
        load_reward_model(causal)
