"""Tokenized cache and batched tokenization: the same examples, batches and resumes as the
one-at-a-time, in-memory path; invalidation on every input; killed or broken builds rebuilt."""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxalign.data import KeyMap, Loader, stack_micro_batches
from jaxalign.data.bulk import encode_chunks
from jaxalign.data.cache import cached
from jaxalign.data.dataset import EncodedDataset, encode_records, load_dataset, read_records
from jaxalign.data.encoding import Encoder
from jaxalign.data.flat import flatten, join
from jaxalign.data.records import DataReport, SFTRecord
from jaxalign.data.store import StoreError, read_store

ROOT = Path(__file__).resolve().parents[2]
LIMITS = dict(max_length=192, max_prompt_length=96)


@pytest.fixture(autouse=True)
def _own_default_cache(tmp_path, monkeypatch):
    """Loaders built from a config without data.cache_dir use the default: keep it in tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _records(spec, family="preference"):
    records, report = read_records(spec, on_bad_record="skip")
    if family == "sft":
        records = [SFTRecord(r.prompt, r.chosen, format=r.format, index=r.index, file=r.file, line=r.line)
                   for r in records]
    return records, report


def _reference(spec, tokenizer, family="preference", encoder_options=None, **kw) -> EncodedDataset:
    """Today's path: one record at a time, a list of examples."""
    records, report = _records(spec, family)
    examples, report = encode_records(records, Encoder(tokenizer, **(encoder_options or {})), on_bad_record="skip",
                                      report=report, **{**LIMITS, **kw})
    return EncodedDataset(examples, report)


def _same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.index == y.index and len(x.sequences) == len(y.sequences)
        for s, t in zip(x.sequences, y.sequences):
            assert (s.prompt_len, s.has_bos) == (t.prompt_len, t.has_bos)
            np.testing.assert_array_equal(s.ids, t.ids)


def _same_report(a: DataReport, b: DataReport):
    assert a.to_json() == b.to_json()


def _same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _conversational(tmp_path) -> str:
    rows = []
    for i in range(12):
        prompt = [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "Be brief."}] + prompt
        rows.append({"prompt": prompt,
                     "chosen": [{"role": "assistant", "content": f"It is {2 * i}." + " Indeed" * (i % 4)}],
                     "rejected": [{"role": "assistant", "content": f"Maybe {i}?"}]})
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("family", ["preference", "sft"])
def test_batched_tokenization_is_bit_identical(tokenizer, hh_path, tmp_path, family):
    conversational = _conversational(tmp_path)  # the BPE template's "assistant: " merges at the boundary
    for spec, options in ((str(hh_path), {}), (str(hh_path), {"on_boundary_merge": "error"}), (conversational, {})):
        reference = _reference(spec, tokenizer, family, encoder_options=options)
        batched = load_dataset(spec, tokenizer, on_bad_record="skip", family=family, encoder_options=options,
                               **LIMITS)
        _same_examples(batched.examples, reference.examples)
        _same_report(batched.report, reference.report)
        assert batched.fingerprint() == reference.fingerprint()
        np.testing.assert_array_equal(batched.lengths(), reference.lengths())
        records, report = _records(spec, family)  # encode_records' batches (the pool workers' path)
        examples, report = encode_records(records, Encoder(tokenizer, **options), on_bad_record="skip",
                                          report=report, batch_size=7, **LIMITS)
        _same_examples(examples, reference.examples)
        _same_report(report, reference.report)


@pytest.mark.slow
def test_process_pool_gives_the_same_chunks(bpe_tokenizer, hh_path):
    records, _ = read_records(str(hh_path), on_bad_record="skip")
    kw = dict(sequences_per_example=2, truncation_mode="keep_end", on_bad_record="skip", **LIMITS)
    pooled = list(encode_chunks(records, bpe_tokenizer, workers=2, chunk_size=37, **kw))
    here = list(encode_chunks(records, bpe_tokenizer, workers=1, chunk_size=37, **kw))
    reference, _ = encode_records(records, Encoder(bpe_tokenizer), truncation_mode="keep_end", on_bad_record="skip",
                                  **LIMITS)
    for chunks in (pooled, here):
        _same_examples(join([c for c, _ in chunks], 2), reference)
    assert [r.to_json() for _, r in pooled] == [r.to_json() for _, r in here]


def _loaders(dataset: EncodedDataset, layout: str, shard: int, shards: int) -> Loader:
    kw = dict(batch_size=4, pad_id=2, seed=5, buckets=(64, 128, 192), shard_index=shard, shard_count=shards)
    if layout == "packed":
        kw.update(packing=True, pack_length=192)
    return Loader(dataset, **kw)


@pytest.mark.parametrize("layout,shards", [("padded", 1), ("packed", 1), ("padded", 2), ("packed", 2)])
def test_cache_gives_the_same_batches_and_resumes(bpe_tokenizer, hh_path, tmp_path, layout, shards):
    reference = _reference(str(hh_path), bpe_tokenizer)
    kw = dict(on_bad_record="skip", cache_dir=str(tmp_path / "cache"), **LIMITS)
    built = load_dataset(str(hh_path), bpe_tokenizer, **kw)
    opened = load_dataset(str(hh_path), bpe_tokenizer, **kw)  # from the entry just written
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert isinstance(opened.examples.tokens, np.memmap)
    for dataset in (built, opened):
        _same_report(dataset.report, reference.report)
        assert dataset.fingerprint() == reference.fingerprint()
        for ref_part, part in zip(reference.split(9, 3), dataset.split(9, 3)):
            assert part.fingerprint() == ref_part.fingerprint()
            _same_examples(part.examples, ref_part.examples)
    train, ref_train = opened.split(9, 3)[0], reference.split(9, 3)[0]
    for q in range(shards):
        ours, theirs = _loaders(train, layout, q, shards), _loaders(ref_train, layout, q, shards)
        assert ours.fingerprint == theirs.fingerprint
        n = ours.batches_in_epoch(0) + 3
        mine, ref = [next(ours) for _ in range(n)], [next(theirs) for _ in range(n)]
        for a, b in zip(mine, ref):
            _same_batch(a, b)
        _same_batch(stack_micro_batches(mine[:2], 2), stack_micro_batches(ref[:2], 2))  # accumulation
        resumed = _loaders(train, layout, q, shards)
        resumed.set_state(theirs.get_state())  # a state saved by today's path resumes on the cache
        _same_batch(next(resumed), next(theirs))
        assert resumed.get_state() == theirs.get_state()


def _tiny_set(tmp_path, name="tiny.jsonl", change="") -> str:
    rows = [{"prompt": f"Human: tell me about {t}\n\nAssistant:", "chosen": f" {t} is a word{change}.",
             "rejected": f" I do not know {t}."} for t in ("cats", "dogs", "rain", "tea")]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_input_keys_its_own_entry(bpe_tokenizer, qwen_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    spec = _tiny_set(tmp_path)
    base = dict(max_length=64, max_prompt_length=32, cache_dir=str(cache))

    def entries(spec=spec, tokenizer=bpe_tokenizer, **kw):
        load_dataset(spec, tokenizer, **{**base, **kw})
        return len(os.listdir(cache))

    templated = copy.deepcopy(bpe_tokenizer)
    templated.chat_template = bpe_tokenizer.chat_template + "{{- '' }}"
    assert entries() == 1
    assert entries(spec=_tiny_set(tmp_path, "moved.jsonl")) == 1  # same content elsewhere: the same entry
    changes = [
        dict(spec=_tiny_set(tmp_path, "changed.jsonl", change="!")),  # source content
        dict(tokenizer=qwen_tokenizer),  # tokenizer
        dict(tokenizer=templated),  # chat template
        dict(max_length=48),  # truncation options
        dict(max_prompt_length=16),
        dict(truncation_mode="keep_end"),
        dict(format="standard"),  # format and keys
        dict(keys=KeyMap(chosen="rejected", rejected="chosen")),
        dict(family="sft"),
        dict(on_bad_record="skip"),
        dict(encoder_options={"add_bos": False}),  # encoder options
    ]
    for n, change in enumerate(changes, 2):
        assert entries(**change) == n, change
    assert entries() == len(changes) + 1  # the first inputs again: their entry, nothing new


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def test_interrupted_and_broken_builds_are_rebuilt(bpe_tokenizer, tmp_path, caplog):
    spec = _tiny_set(tmp_path)
    cache = tmp_path / "cache"
    kw = dict(max_length=64, max_prompt_length=32, cache_dir=str(cache))
    reference = load_dataset(spec, bpe_tokenizer, max_length=64, max_prompt_length=32)
    examples = reference.examples

    def interrupted(report):
        yield examples.take(np.arange(2))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached(str(cache), {"x": 1}, [spec], interrupted, 2, write=True)
    assert os.listdir(cache) == []  # neither an entry nor its temporary directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first = load_dataset(spec, bpe_tokenizer, **kw)  # the entry, then a killed build's leftovers beside it
    entry = _entry(cache)
    leftover = cache / f".{entry.name}.tmp-{socket.gethostname()}-{int(dead.stdout)}-abcd"
    leftover.mkdir()
    (leftover / "tokens.bin").write_bytes(b"\0" * 8)
    for damage in ("marker", "tokens", "meta"):
        if damage == "marker":
            (entry / "COMPLETE").unlink()
        elif damage == "tokens":
            with open(entry / "tokens.bin", "r+b") as f:
                f.truncate(12)
        else:
            (entry / "meta.json").write_text("{not json")
        with pytest.raises(StoreError, match={"marker": "COMPLETE", "tokens": "tokens.bin", "meta": "meta.json"}[damage]):
            read_store(str(entry))
        reader = load_dataset(spec, bpe_tokenizer, write_cache=False, **kw)  # not the writer: in memory
        assert not isinstance(reader.examples.tokens, np.memmap)
        rebuilt = load_dataset(spec, bpe_tokenizer, **kw)  # the writer rebuilds it
        assert isinstance(rebuilt.examples.tokens, np.memmap)
        for dataset in (reader, rebuilt):
            assert dataset.fingerprint() == first.fingerprint() == reference.fingerprint()
        entry = _entry(cache)
    assert not leftover.exists()
    assert "unreadable" in caplog.text


_BUILD = """
import sys
from jaxalign.data.dataset import load_dataset
from jaxalign.tokenizers import load_tokenizer
if __name__ == "__main__":
    load_dataset(sys.argv[1], load_tokenizer(sys.argv[2]), on_bad_record="skip", max_length=192,
                 max_prompt_length=96, cache_dir=sys.argv[3], workers=1)
"""


@pytest.mark.slow
def test_a_killed_build_leaves_no_entry(bpe_tokenizer_dir, bpe_tokenizer, hh_rows, tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_rows * 5))
    cache = tmp_path / "cache"
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(data), str(bpe_tokenizer_dir), str(cache)], env=env)
    deadline = time.time() + 60
    while not (cache.is_dir() and any(p.name.startswith(".") for p in cache.iterdir())):
        assert time.time() < deadline and proc.poll() is None, "the build never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []  # nothing looks complete
    dataset = load_dataset(str(data), bpe_tokenizer, on_bad_record="skip", cache_dir=str(cache), workers=1, **LIMITS)
    assert sorted(os.listdir(cache)) == [_entry(cache).name]  # rebuilt; the dead build's directory removed
    reference = load_dataset(str(data), bpe_tokenizer, on_bad_record="skip", workers=1, **LIMITS)
    assert dataset.fingerprint() == reference.fingerprint()


def test_flat_examples_behave_like_a_list(bpe_tokenizer, hh_path):
    reference = _reference(str(hh_path), bpe_tokenizer)
    flat = flatten(reference.examples, 2)
    _same_examples(flat, reference.examples)
    _same_examples(flat[5:17:3], reference.examples[5:17:3])
    _same_examples([flat[-1]], reference.examples[-1:])
    assert EncodedDataset(flat[3:40], DataReport()).fingerprint() == \
        EncodedDataset(reference.examples[3:40], DataReport()).fingerprint()
    with pytest.raises(IndexError):
        flat[len(flat)]



@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_share_one_cache_with_one_writer(bpe_tokenizer_dir, bpe_tokenizer, hh_path, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    args = [str(hh_path), str(bpe_tokenizer_dir), str(cache), str(tmp_path)]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "cache_worker.py"), str(port), str(q), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for q in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for q, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {q} exited with {p.returncode}:\n{log[-4000:]}"
    assert len(os.listdir(cache)) == 1  # one entry, no temporary directory left
    train = _reference(str(hh_path), bpe_tokenizer).split(9, 0)[0]
    for q in range(2):
        result = pickle.loads((tmp_path / f"process{q}.pkl").read_bytes())
        assert result["mapped"] == "memmap" and result["fingerprint"] == train.fingerprint()
        reference = Loader(train, batch_size=4, pad_id=2, seed=0, buckets=(64, 128, 192), shard_index=q, shard_count=2)
        for batch in result["batches"]:
            _same_batch(batch, next(reference))
