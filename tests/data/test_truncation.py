"""Truncation grid: short/long prompt x short/long completions x modes x prompt limits.

No empty completion ever reaches a batch: each example keeps >= 1 completion token or is
dropped and counted.
"""

import itertools

import numpy as np
import pytest

from jaxalign.data import Encoder, PreferenceRecord, padded_batch, truncate_pair
from jaxalign.data.dataset import encode_records
from jaxalign.data.truncation import check_limits

MAX_LENGTH = 32
PROMPTS = {"short": "\n\nHuman: hi\n\nAssistant:", "long": "\n\nHuman:" + " tell me more" * 40 + "\n\nAssistant:"}
COMPLETIONS = {"short": " Sure.", "long": " Here is a very long answer" * 20}
GRID = list(itertools.product(PROMPTS, COMPLETIONS, COMPLETIONS, ("keep_start", "keep_end"), (None, 12)))


def _check_side(orig, seq, max_prompt_length):
    assert len(seq) <= MAX_LENGTH
    assert seq.completion_len >= 1
    b = int(orig.has_bos)
    if b:
        assert seq.ids[0] == orig.ids[0] and seq.has_bos
    if max_prompt_length is not None:
        assert seq.prompt_len <= max_prompt_length
    # The prompt keeps its end (cut from the left), the completion its start (cut from the right).
    kept_prompt = seq.ids[b: seq.prompt_len]
    assert (orig.ids[orig.prompt_len - len(kept_prompt): orig.prompt_len] == kept_prompt).all()
    assert (orig.ids[orig.prompt_len: orig.prompt_len + seq.completion_len] == seq.ids[seq.prompt_len:]).all()
    assert seq.completion_len == min(orig.completion_len, MAX_LENGTH - seq.prompt_len)


def _expected_prompt_len(pair, max_prompt_length, mode):
    """keep_start: the prompt limit alone; keep_end: also shrink (to BOS + 1) for the longer completion."""
    keep = pair.chosen.prompt_len if max_prompt_length is None else min(pair.chosen.prompt_len, max_prompt_length)
    if mode == "keep_end":
        longest = max(pair.chosen.completion_len, pair.rejected.completion_len)
        keep = max(1 + int(pair.chosen.has_bos), min(keep, MAX_LENGTH - longest))
    return keep


@pytest.mark.parametrize("tokenizer_name", ["bpe", "qwen"])
def test_truncation_grid(request, tokenizer_name):
    tok = request.getfixturevalue(f"{tokenizer_name}_tokenizer")
    enc = Encoder(tok)
    kept_pairs, expected_drops = [], 0
    for i, (p, c, r, mode, mpl) in enumerate(GRID):
        record = PreferenceRecord(PROMPTS[p], COMPLETIONS[c], COMPLETIONS[r] + " (rejected)", index=i)
        pair = enc.encode_pair(record)
        out = truncate_pair(pair, max_length=MAX_LENGTH, max_prompt_length=mpl, mode=mode)
        # Only keep_start without a prompt limit can leave no room: the prompt alone fills max_length.
        should_drop = mode == "keep_start" and mpl is None and pair.chosen.prompt_len >= MAX_LENGTH
        assert (out is None) == should_drop, (p, c, r, mode, mpl)
        if out is None:
            expected_drops += 1
            continue
        _check_side(pair.chosen, out.chosen, mpl)
        _check_side(pair.rejected, out.rejected, mpl)
        assert out.chosen.prompt_len == _expected_prompt_len(pair, mpl, mode)
        fits = all(len(s) <= MAX_LENGTH and (mpl is None or s.prompt_len <= mpl) for s in pair.sequences)
        assert (out is pair) == fits  # nothing to cut: untouched
        # One shared prompt stays shared.
        assert (out.chosen.ids[: out.chosen.prompt_len] == out.rejected.ids[: out.rejected.prompt_len]).all()
        kept_pairs.append(out)
    assert expected_drops == 4  # long prompt x 2 x 2 completion lengths, keep_start without a prompt limit

    # Through the pipeline: the same drops are counted, and every sequence of every batch has
    # at least one loss token.
    records = [PreferenceRecord(PROMPTS[p], COMPLETIONS[c], COMPLETIONS[r] + " (rejected)", index=i)
               for i, (p, c, r, _, _) in enumerate(GRID)]
    for mode, mpl in itertools.product(("keep_start", "keep_end"), (None, 12)):
        examples, report = encode_records(records, Encoder(tok), max_length=MAX_LENGTH, max_prompt_length=mpl,
                                          truncation_mode=mode)
        drops = 16 if (mode, mpl) == ("keep_start", None) else 0  # the 16 long-prompt records of GRID
        assert report.dropped["no completion token left"] == drops
        assert len(examples) == len(GRID) - drops
        batch = padded_batch(examples, length=MAX_LENGTH, pad_id=0)
        per_sequence = np.bincount(batch["sequence_ids"][batch["sequence_ids"] >= 0],
                                   weights=batch["loss_mask"][batch["sequence_ids"] >= 0], minlength=2 * len(examples))
        assert (per_sequence >= 1).all()


def test_dove_sides_are_cut_independently(bpe_tokenizer):
    enc = Encoder(bpe_tokenizer)
    long_prompt = "Please" + " explain this" * 30
    record = PreferenceRecord("Hi.", " Sure thing, friend.", " Sure.", rejected_prompt=long_prompt)
    pair = enc.encode_pair(record)
    out = truncate_pair(pair, max_length=16, max_prompt_length=8, mode="keep_start")
    assert out.chosen is pair.chosen  # short side untouched
    assert out.rejected.prompt_len == 8 and out.rejected.completion_len == pair.rejected.completion_len


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_prompt_length must lie in"):
        check_limits(32, 32, "keep_start")
    with pytest.raises(ValueError, match="truncation mode 'keep_middle' is not one of"):
        check_limits(32, 8, "keep_middle")
    with pytest.raises(ValueError, match="max_length must be >= 3"):
        check_limits(2, None, "keep_start")
