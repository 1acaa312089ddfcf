"""Cutting a prompt so that only its tail is tokenized again with each completion
(``jaxalign.data.prompt_cut``): the cut must give the whole text's tokens, bit for bit."""

import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxalign.data import encoding, prompt_cut
from jaxalign.data.dataset import read_records
from jaxalign.data.encoding import Encoder
from jaxalign.data.prompt_cut import cuttable, last_cut
from jaxalign.tokenizers import QWEN2_5_PATTERN

LLAMA3_PATTERN = QWEN2_5_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PIECES = ["\n", "\n\n", "\n \n", " \n", " ", "  ", "\t", "\r\n", "\u00a0", "\u3000", "Human:", "Assistant:", " the",
          "word", "'s", "'ll", "12345", "7", "!", "?!", ".\n", "--", "<", "#", "é", "e\u0301", "\u0301", "你好",
          "🙂", "ﬁ", "<|im_start|>", "<|im_end|>", "<|eos|>", "A", "z"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(2, 24))) for _ in range(n)]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _with_pre_tokenizer(tok, pre_tokenizer, **tokens) -> PreTrainedTokenizerFast:
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizer
    if tokens.get("added"):
        backend.add_special_tokens([tokens["added"]])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token)


@pytest.fixture(scope="module")
def cut_tokenizers(bpe_tokenizer, qwen_tokenizer):
    """The GPT-2-regex BPE, Qwen2.5 (NFC + its regex), and Qwen's vocabulary under Llama-3's regex."""
    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return {"bpe": bpe_tokenizer, "qwen": qwen_tokenizer, "llama3": _with_pre_tokenizer(qwen_tokenizer, llama3)}


def test_cuttable_accepts_byte_level_bpe_and_refuses_the_rest(cut_tokenizers, bpe_tokenizer):
    assert all(cuttable(tok) for tok in cut_tokenizers.values())
    prefix_space = pre_tokenizers.ByteLevel(add_prefix_space=True)
    other_regex = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]+"), "isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    lstrip = AddedToken("<mask>", lstrip=True, special=True)
    metaspace = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], 0, byte_fallback=False))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    refused = [
        _with_pre_tokenizer(bpe_tokenizer, prefix_space),
        _with_pre_tokenizer(bpe_tokenizer, other_regex),
        _with_pre_tokenizer(bpe_tokenizer, pre_tokenizers.ByteLevel(add_prefix_space=False), added=lstrip),
        PreTrainedTokenizerFast(tokenizer_object=metaspace, eos_token="<unk>"),
        object(),  # no fast backend
    ]
    assert not any(cuttable(tok) for tok in refused)


def test_last_cut():
    assert last_cut("a\n\nAssistant:") == 3
    assert last_cut("\n\nHuman: hi\n\nAssistant: \n ") == 13  # the cut needs a printable ASCII after "\n"
    assert last_cut("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n") == 30
    assert last_cut("no newline") == last_cut("ends with\n") == last_cut("\n") == last_cut("") == 0
    assert last_cut("x\né") == 0


@pytest.mark.parametrize("name", ["bpe", "qwen", "llama3"])
def test_every_cut_gives_the_whole_texts_tokens(cut_tokenizers, name):
    """For every cut position (not only the last) of adversarial prompts, ``tok(P)`` ends with
    ``tok(P[k:])`` and ``tok(P + X) == tok(P)[:j] + tok(P[k:] + X)``."""
    tok = cut_tokenizers[name]
    prompts, completions = _texts(400, seed=1), _texts(400, seed=2)
    checked = 0
    for prompt, completion in zip(prompts, completions):
        whole, full = _ids(tok, prompt), _ids(tok, prompt + completion)
        for k in range(1, len(prompt)):
            if prompt[k - 1] != "\n" or prompt[k] not in prompt_cut._CUT_BEFORE:
                continue
            tail = _ids(tok, prompt[k:])
            head = len(whole) - len(tail)
            assert whole[head:] == tail, (prompt, k)
            assert full == whole[:head] + _ids(tok, prompt[k:] + completion), (prompt, completion, k)
            checked += 1
    assert checked > 300


def test_the_cut_condition_matters(bpe_tokenizer):
    """Cut after a space instead of a newline and the tail's tokens are not the whole's."""
    prompt, k = "Hello world", 6
    whole, tail = _ids(bpe_tokenizer, prompt), _ids(bpe_tokenizer, prompt[k:])
    assert whole[len(whole) - len(tail):] != tail


def test_a_cut_that_does_not_hold_falls_back_to_the_whole_text(tokenizer, hh_path, monkeypatch):
    """With cuts in the middle of words, ``encode_many`` still equals ``encode``, record by record
    (and in its count of boundary merges, where a wrong cut would otherwise hide)."""
    records, _ = read_records(str(hh_path), on_bad_record="skip")
    one_at_a_time = Encoder(tokenizer)
    reference = [one_at_a_time.encode(r) for r in records[:60]]
    monkeypatch.setattr(encoding, "last_cut", lambda text: len(text) // 2 if len(text) > 1 else 0)
    encoder = Encoder(tokenizer)
    whole: list[str] = []
    monkeypatch.setattr(encoder, "_ids", lambda text: whole.append(text) or _ids(tokenizer, text))
    batched = encoder.encode_many(records[:60])
    assert len(whole) > 30  # most of these cuts fail the check and are tokenized whole
    for ref, got in zip(reference, batched):
        for a, b in zip(ref.sequences, got.sequences):
            assert a.ids.tolist() == b.ids.tolist() and a.prompt_len == b.prompt_len
    assert encoder.boundary_merges == one_at_a_time.boundary_merges
