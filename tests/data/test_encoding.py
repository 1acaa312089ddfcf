"""Token boundaries on two real tokenizers (Qwen2.5 vocabulary, no BOS; byte-level BPE with BOS).

Masks cover exactly the completion tokens (the first one included), one BOS at most and at
position 0, one EOS/end-of-turn at the end of every completion, the boundary-merge case.
"""

import pytest

from jaxalign.data import Encoder, FieldError, PreferenceRecord, SFTRecord, loss_mask, parse_row
from jaxalign.data.dataset import read_records
from jaxalign.data.records import PromptRecord
from jaxalign.tokenizers import build_bpe_tokenizer, load_tokenizer

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def count(ids, token_id) -> int:
    return int((ids == token_id).sum()) if token_id is not None else 0


def assert_well_formed(tok, enc, seq, completion_text: str, prompt_text: str | None = None):
    """The completion tokens decode to the completion + one EOS; BOS once (or never); mask exact."""
    ids = seq.ids
    if enc.add_bos:
        assert ids[0] == tok.bos_token_id and count(ids, tok.bos_token_id) == 1 and seq.has_bos
    else:
        assert tok.bos_token_id is None or count(ids, tok.bos_token_id) == 0
    completion = ids[seq.prompt_len:]
    assert completion[-1] == enc.eos_id and count(completion, enc.eos_id) == 1
    assert tok.decode(completion[:-1].tolist()) == completion_text
    if prompt_text is not None:
        assert tok.decode(ids[: seq.prompt_len].tolist()) == prompt_text
    mask = loss_mask(seq, "completion")
    assert mask.sum() == len(completion) >= 2
    assert mask[seq.prompt_len] == 1 and mask[seq.prompt_len - 1] == 0  # first completion token counts
    assert mask[: seq.prompt_len].sum() == 0 and mask[seq.prompt_len:].all()


def test_standard_pair(tokenizer):
    enc = Encoder(tokenizer)
    record = PreferenceRecord("\n\nHuman: What is 2+2?\n\nAssistant:", " It is 4.", " Five, surely.")
    pair = enc.encode_pair(record)
    bos = tokenizer.bos_token if enc.add_bos else ""
    assert_well_formed(tokenizer, enc, pair.chosen, " It is 4.", bos + record.prompt)
    assert_well_formed(tokenizer, enc, pair.rejected, " Five, surely.", bos + record.prompt)
    assert (pair.chosen.ids[: pair.chosen.prompt_len] == pair.rejected.ids[: pair.rejected.prompt_len]).all()
    # The completion ids are exactly the tokens prompt + completion has after the prompt's tokens.
    full = tokenizer(record.prompt + record.chosen, add_special_tokens=False)["input_ids"]
    assert pair.chosen.ids[int(enc.add_bos):-1].tolist() == full
    assert enc.boundary_merges == 0


def test_tokenizer_bos_conventions(bpe_tokenizer, qwen_tokenizer):
    """The BPE prepends BOS like Llama tokenizers; Qwen2.5 has none."""
    assert Encoder(bpe_tokenizer).add_bos and not Encoder(qwen_tokenizer).add_bos
    with pytest.raises(ValueError, match="add_bos=True but the tokenizer has no bos_token"):
        Encoder(qwen_tokenizer, add_bos=True)


def test_hh_rlhf_rows_on_both_tokenizers(tokenizer, hh_path):
    records, _ = read_records(str(hh_path), on_bad_record="skip")
    enc = Encoder(tokenizer)
    bos = tokenizer.bos_token if enc.add_bos else ""
    for r in records:
        pair = enc.encode_pair(r)
        assert_well_formed(tokenizer, enc, pair.chosen, r.chosen, bos + r.prompt)
        assert_well_formed(tokenizer, enc, pair.rejected, r.rejected, bos + r.prompt)
    # HH completions start with " word" after "Assistant:": no BPE merge crosses the boundary.
    assert enc.boundary_merges == 0


def test_multi_turn_conversation_trains_only_the_final_assistant_turn(tokenizer):
    enc = Encoder(tokenizer)
    prompt = [{"role": "system", "content": "You are terse."}, U("Name a color."), A("Red."), U("Another one?")]
    record = parse_row({"prompt": prompt, "chosen": [A("Blue.")], "rejected": [A("No.")]})
    pair = enc.encode_pair(record)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    for seq, reply in ((pair.chosen, "Blue."), (pair.rejected, "No.")):
        assert_well_formed(tokenizer, enc, seq, reply, prompt_text)
        trained = seq.ids[loss_mask(seq, "completion") == 1]
        assert tokenizer.decode(trained.tolist()) == reply + tokenizer.eos_token
        # The earlier assistant turn sits in the (masked) prompt.
        assert "Red." in tokenizer.decode(seq.ids[: seq.prompt_len].tolist())
    # Qwen's end-of-turn <|im_end|> closes every earlier turn too, but once in the completion.
    if tokenizer.eos_token == "<|im_end|>":
        assert count(pair.chosen.ids, enc.eos_id) == 5


def test_boundary_merge_is_detected_and_split(qwen_tokenizer):
    """"Answer: " + "Hello": alone the prompt ends with a space token, joined it is " Hello"."""
    tok = qwen_tokenizer
    prompt, completion = "Question: say hi\nAnswer: ", "Hello there"
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    assert full[: len(p)] != p  # the real merge this test is about
    enc = Encoder(tok)
    seq = enc.encode_sequence(prompt, completion)
    assert enc.boundary_merges == 1
    assert seq.ids[: seq.prompt_len].tolist() == p  # exactly what the model sees when generating
    assert_well_formed(tok, enc, seq, completion, prompt)
    with pytest.raises(FieldError, match="chosen: a token merges across the prompt/completion boundary"):
        Encoder(tok, on_boundary_merge="error").encode_sequence(prompt, completion)


def test_boundary_merge_in_a_chat_template(bpe_tokenizer):
    """The small BPE's template ends the prompt with "assistant: ", which merges with the reply."""
    enc = Encoder(bpe_tokenizer)
    pair = enc.encode_pair(parse_row({"prompt": [U("hi")], "chosen": [A("yo")], "rejected": [A("nah")]}))
    assert enc.boundary_merges == 2
    prompt_text = bpe_tokenizer.apply_chat_template([U("hi")], tokenize=False, add_generation_prompt=True)
    assert_well_formed(bpe_tokenizer, enc, pair.chosen, "yo", prompt_text)
    with pytest.raises(FieldError, match="merges across the prompt/completion boundary"):
        Encoder(bpe_tokenizer, on_boundary_merge="error").encode_sequence([U("hi")], [A("yo")])


def test_no_doubled_bos_or_eos(tokenizer):
    enc = Encoder(tokenizer)
    eos = tokenizer.eos_token
    # A completion that already ends with the end-of-turn token does not get a second one.
    seq = enc.encode_sequence("Q:", " fine" + eos)
    assert_well_formed(tokenizer, enc, seq, " fine")
    # Trailing whitespace after it (as chat templates render) is dropped, not trained.
    seq = enc.encode_sequence("Q:", " fine" + eos + "\n")
    assert_well_formed(tokenizer, enc, seq, " fine")
    if enc.add_bos:  # a prompt that already starts with the BOS text keeps one BOS
        seq = enc.encode_sequence(tokenizer.bos_token + "Q:", " fine")
        assert_well_formed(tokenizer, enc, seq, " fine", tokenizer.bos_token + "Q:")


def test_dove_masks_prompt_and_completion_but_not_the_first_token(tokenizer):
    enc = Encoder(tokenizer)
    record = parse_row({"i_chosen": "Write a haiku.", "r_chosen": " Leaves fall.", "i_reject": "Write a poem.", "r_reject": " No."})
    pair = enc.encode_pair(record)
    for seq, prompt in ((pair.chosen, "Write a haiku."), (pair.rejected, "Write a poem.")):
        bos = tokenizer.bos_token if enc.add_bos else ""
        assert tokenizer.decode(seq.ids[: seq.prompt_len].tolist()) == bos + prompt
        mask = loss_mask(seq, "prompt_and_completion")
        assert mask[0] == 0 and mask[1:].all()  # BOS (or the unscorable first token) excluded


def test_sft_and_prompt_encoding(tokenizer):
    enc = Encoder(tokenizer)
    record = parse_row({"messages": [U("hi"), A("hello"), U("bye?"), A("Bye!")]})
    assert isinstance(record, SFTRecord)
    ex = enc.encode_sft(record)
    trained = ex.sequence.ids[loss_mask(ex.sequence, "completion") == 1]
    assert tokenizer.decode(trained.tolist()) == "Bye!" + tokenizer.eos_token
    ids = enc.encode_prompt(PromptRecord([U("hi")]))
    assert tokenizer.decode(ids.tolist()) == tokenizer.apply_chat_template([U("hi")], tokenize=False, add_generation_prompt=True)
    assert count(ids, tokenizer.bos_token_id) == int(enc.add_bos)


def test_template_problems_are_record_errors(tmp_path):
    tok = load_tokenizer(build_bpe_tokenizer(tmp_path, vocab_size=300, corpus=["user: hi assistant: yo"] * 4))
    tok.chat_template = "{{ messages|length }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(FieldError, match="chosen: the chat template is not prefix-preserving"):
        Encoder(tok).encode_sequence([U("hi")], [A("yo")])
    tok.chat_template = None
    with pytest.raises(FieldError, match="rejected: conversational record but the tokenizer has no chat template"):
        Encoder(tok).encode_sequence([U("hi")], [A("yo")], "rejected")
