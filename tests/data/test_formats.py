"""Record formats: detection, normalisation, HH-RLHF implicit-prompt extraction on real rows."""

import os

import pytest

from jaxalign.data import FieldError, KeyMap, PreferenceRecord, PromptRecord, SFTRecord, detect_format, parse_row
from jaxalign.data.dataset import read_records
from jaxalign.data.formats import HH_ASSISTANT_MARKER, split_implicit_messages, split_implicit_text

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def test_standard():
    r = parse_row({"prompt": "Q?", "chosen": " yes", "rejected": " no", "extra": 1})
    assert isinstance(r, PreferenceRecord) and r.format == "standard"
    assert (r.prompt, r.chosen, r.rejected, r.rejected_prompt) == ("Q?", " yes", " no", None)


def test_conversational():
    row = {"prompt": [{"role": "system", "content": "be brief"}, U("hi")], "chosen": [A("hello")], "rejected": [A("go away")]}
    r = parse_row(row)
    assert r.format == "conversational"
    assert r.prompt == row["prompt"] and r.chosen == [A("hello")] and r.rejected == [A("go away")]
    with pytest.raises(FieldError, match=r"chosen\[0\].role: a completion must start with an assistant message"):
        parse_row({"prompt": [U("hi")], "chosen": [U("x")], "rejected": [A("y")]})
    with pytest.raises(FieldError, match="chosen: expected a message list like prompt"):
        parse_row({"prompt": [U("hi")], "chosen": "x", "rejected": [A("y")]})


def test_hh_rlhf_prompt_extraction_on_real_rows(hh_path, hh_rows):
    records, report = read_records(str(hh_path), on_bad_record="skip")
    assert report.rows == 200 and report.formats == {"implicit": 199}
    # The one bad row of the slice: its chosen reply is a lone space after the shared prefix.
    assert [str(b) for b in report.bad] == [f"{hh_path}:87: chosen: empty"]
    assert hh_rows[86]["chosen"].endswith(HH_ASSISTANT_MARKER + " ")
    for r in records:
        row = hh_rows[r.line - 1]
        assert r.format == "implicit"
        assert r.prompt.endswith(HH_ASSISTANT_MARKER) and r.prompt.startswith("\n\nHuman:")
        assert r.prompt + r.chosen == row["chosen"] and r.prompt + r.rejected == row["rejected"]
        # Longest such prefix: the two completions share no further assistant-turn marker.
        assert HH_ASSISTANT_MARKER not in os.path.commonprefix([r.chosen, r.rejected])
    assert [r.index for r in records] == list(range(199))
    # Row 1 by hand: a three-turn dialogue whose replies differ in the final assistant turn.
    first = records[0]
    assert first.prompt.count("\n\nHuman:") == 3 and first.prompt.count(HH_ASSISTANT_MARKER) == 3
    assert first.prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first.chosen.startswith(" No, sorry!  All of these involve a pen")
    assert first.rejected.startswith(" There are lots of funny things you can do with pens")


def test_implicit_text_cuts_back_to_the_marker():
    prompt, c, r = split_implicit_text("\n\nHuman: hi\n\nAssistant: I like cats", "\n\nHuman: hi\n\nAssistant: I like dogs")
    assert (prompt, c, r) == ("\n\nHuman: hi\n\nAssistant:", " I like cats", " I like dogs")
    with pytest.raises(FieldError, match="no shared prefix ending at the assistant-turn marker"):
        split_implicit_text("Human: a", "Human: b")


def test_implicit_messages():
    chosen = [U("hi"), A("hello"), U("how are you?"), A("fine")]
    rejected = [U("hi"), A("hello"), U("how are you?"), A("bad")]
    r = parse_row({"chosen": chosen, "rejected": rejected})
    assert r.format == "implicit" and r.prompt == chosen[:3] and r.chosen == [A("fine")] and r.rejected == [A("bad")]
    # Diverging at an earlier assistant turn: the prompt stops before it.
    p, c, _ = split_implicit_messages([U("a"), A("b"), U("c"), A("d")], [U("a"), A("x"), U("c"), A("d")])
    assert p == [U("a")] and c == [A("b"), U("c"), A("d")]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt_chosen": "Q1", "chosen": " a", "prompt_rejected": "Q2", "rejected": " b"},
        {"prompt_chosen": "Q1", "response_chosen": " a", "prompt_rejected": "Q2", "response_rejected": " b"},
        {"i_chosen": "Q1", "r_chosen": " a", "i_reject": "Q2", "r_reject": " b"},
    ],
)
def test_dove_joint_pairs(row):
    r = parse_row(row)
    assert r.format == "dove" and r.is_joint
    assert (r.prompt, r.chosen, r.rejected_side_prompt, r.rejected) == ("Q1", " a", "Q2", " b")


def test_dove_conditional_and_identical():
    r = parse_row({"i_chosen": "Q", "r_chosen": " a", "i_reject": "Q", "r_reject": " b"})
    assert r.rejected_side_prompt == r.prompt == "Q"
    with pytest.raises(FieldError, match="r_reject: identical pair"):
        parse_row({"i_chosen": "Q", "r_chosen": " a", "i_reject": "Q", "r_reject": " a"})


def test_sft_and_prompt_only():
    r = parse_row({"messages": [U("hi"), A("a"), U("again"), A("b")]})
    assert isinstance(r, SFTRecord) and r.prompt == [U("hi"), A("a"), U("again")] and r.completion == [A("b")]
    r = parse_row({"prompt": "Q", "completion": " A"})
    assert isinstance(r, SFTRecord) and (r.prompt, r.completion) == ("Q", " A")
    r = parse_row({"prompt": [U("hi")]})
    assert isinstance(r, PromptRecord) and r.prompt == [U("hi")]
    with pytest.raises(FieldError, match="messages: must hold at least one message before a final assistant"):
        parse_row({"messages": [U("hi"), A("a"), U("again")]})


def test_key_mapping_and_forced_format():
    row = {"question": "Q", "good": " y", "bad": " n", "prompt": "ignored"}
    r = parse_row(row, keys=KeyMap(prompt="question", chosen="good", rejected="bad"))
    assert (r.prompt, r.chosen, r.rejected) == ("Q", " y", " n")
    with pytest.raises(FieldError, match="prompt: format 'standard' expects a string"):
        parse_row({"prompt": [U("x")], "chosen": [A("y")], "rejected": [A("z")]}, format="standard")


def test_detection_and_validation_errors():
    assert detect_format({"chosen": "a", "rejected": "b"}) == "implicit"
    with pytest.raises(FieldError, match=r"<row>: cannot detect the format from keys \['foo'\]"):
        parse_row({"foo": 1})
    with pytest.raises(FieldError, match="<row>: expected a JSON object, got list"):
        parse_row([1, 2])
    with pytest.raises(FieldError, match="chosen: missing"):
        parse_row({"prompt": "Q", "rejected": "r"}, format="standard")
    with pytest.raises(FieldError, match="rejected: expected a string or a list of messages, got int"):
        parse_row({"prompt": "Q", "chosen": "c", "rejected": 3})
    with pytest.raises(FieldError, match=r"prompt\[0\].role: unknown role 'bot'"):
        parse_row({"prompt": [{"role": "bot", "content": "x"}], "chosen": [A("y")], "rejected": [A("z")]})
    with pytest.raises(FieldError, match="rejected: identical to chosen"):
        parse_row({"prompt": "Q", "chosen": " same", "rejected": " same"})
    with pytest.raises(FieldError, match="chosen: empty"):
        parse_row({"prompt": "Q", "chosen": "  \n", "rejected": " r"})
    with pytest.raises(FieldError, match="r_reject: missing \\(the row has 'i_chosen', 'r_chosen', 'i_reject'\\)"):
        parse_row({"i_chosen": "Q", "r_chosen": " a", "i_reject": "Q2"})
    with pytest.raises(FieldError, match="chosen: is null"):
        parse_row({"prompt": "Q", "chosen": None, "rejected": " r"})
