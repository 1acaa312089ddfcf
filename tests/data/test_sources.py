"""Sources (JSONL, .jsonl.gz, Parquet, TFDS array_record) and one bad-input test per case."""

import gzip
import json

import pytest

from jaxalign.data import DataError, SourceError, read_records, resolve_source

ROWS = [
    {"prompt": "Q1", "chosen": " yes", "rejected": " no"},
    {"prompt": [{"role": "user", "content": "héllo"}], "chosen": [{"role": "assistant", "content": "hi"}],
     "rejected": [{"role": "assistant", "content": "go"}]},
    {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b"},
]


def _jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return path


def _key(r):
    return (json.dumps(r.prompt), json.dumps(r.chosen), json.dumps(r.rejected), r.format)


def test_jsonl_gzip_parquet_and_specs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = _jsonl(tmp_path / "a.jsonl", ROWS)
    zipped = tmp_path / "b.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    pq.write_table(pa.Table.from_pylist(ROWS[:1] * 2), tmp_path / "c.parquet")
    want = [_key(r) for r in read_records(str(plain))[0]]
    assert [r[3] for r in want] == ["standard", "conversational", "implicit"]
    assert [_key(r) for r in read_records(str(zipped))[0]] == want
    records, report = read_records(str(tmp_path / "c.parquet"))
    assert [_key(r) for r in records] == [want[0]] * 2 and [r.line for r in records] == [1, 2]
    # A directory, a glob and a comma-separated list name the same files.
    everything, report = read_records(str(tmp_path))
    assert report.rows == 8 and [r.index for r in everything] == list(range(8))
    assert resolve_source(f"{tmp_path}/*.jsonl*") == [str(plain), str(zipped)]
    assert resolve_source(f"{plain}, {zipped}") == [str(plain), str(zipped)]
    with pytest.raises(SourceError, match="no such file"):
        resolve_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SourceError, match="unknown file type"):
        resolve_source(str(_jsonl(tmp_path / "x.csv", [])))


def test_tfds_array_record_without_tensorflow(tmp_path):
    """A TFDS dataset written locally as array_record, read back through tfds.data_source."""
    import sys

    import tensorflow_datasets as tfds

    msg = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})

    class TinyPrefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        # tfds locates a builder's source file through the optional `importlib_resources`
        # package; a builder defined inside a test needs no source file.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"prompt": msg, "chosen": msg, "rejected": msg}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"prompt": [{"role": "user", "content": f"hé {i}"}],
                          "chosen": [{"role": "assistant", "content": f"yes {i}"}],
                          "rejected": [{"role": "assistant", "content": f"no {i}"}]}

    TinyPrefs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    records, report = read_records("tfds:tiny_prefs:train", tfds_data_dir=str(tmp_path))
    assert report.formats == {"conversational": 3}
    got = sorted((r.prompt[0]["content"], r.chosen[0]["content"], r.rejected[0]["content"]) for r in records)
    assert got == [(f"hé {i}", f"yes {i}", f"no {i}") for i in range(3)]
    assert all(r.file == "tfds:tiny_prefs:train" and 1 <= r.line <= 3 for r in records)
    assert "tensorflow" not in sys.modules
    with pytest.raises(SourceError, match="cannot open TFDS dataset 'nope'"):
        read_records("tfds:nope", tfds_data_dir=str(tmp_path))


GOOD = {"prompt": "Q", "chosen": " a", "rejected": " b"}
BAD_LINES = {
    "not JSON": (b'{"prompt": "Q", "chosen": " a",', "<line>", "not JSON: "),
    "not an object": (b"[1, 2]", "<row>", "expected a JSON object, got list"),
    "missing field": (json.dumps({"prompt": "Q", "chosen": " a"}).encode(), "rejected", "missing (the row has 'chosen')"),
    "no known keys": (json.dumps({"question": "Q"}).encode(), "<row>", "cannot detect the format"),
    "missing field (format given)": (json.dumps({"prompt": "Q", "chosen": " a"}).encode(), "rejected", "missing"),
    "wrong type": (json.dumps({"prompt": "Q", "chosen": 5, "rejected": " b"}).encode(), "chosen", "expected a string or a list of messages, got int"),
    "empty chosen": (json.dumps({"prompt": "Q", "chosen": "", "rejected": " b"}).encode(), "chosen", "empty"),
    "empty rejected": (json.dumps({"prompt": "Q", "chosen": " a", "rejected": " "}).encode(), "rejected", "empty"),
    "chosen == rejected": (json.dumps({"prompt": "Q", "chosen": " a", "rejected": " a"}).encode(), "rejected", "identical to chosen"),
    "non-UTF-8": (b'{"prompt": "Q\xff\xfe", "chosen": " a", "rejected": " b"}', "<line>", "non-UTF-8 bytes at byte 13"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_row_is_named_or_skipped_and_counted(tmp_path, case):
    line, field, problem = BAD_LINES[case]
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    fmt = "standard" if "format given" in case else "auto"
    with pytest.raises(DataError) as e:
        read_records(str(path), format=fmt)
    assert str(e.value).startswith(f"{path}:2: {field}: {problem}")
    assert (e.value.bad.file, e.value.bad.line, e.value.bad.field) == (str(path), 2, field)
    records, report = read_records(str(path), format=fmt, on_bad_record="skip")
    assert [r.line for r in records] == [1, 3] and len(report.bad) == 1
    assert str(report.bad[0]).startswith(f"{path}:2: {field}: {problem}")
    assert "bad records: 1" in report.summary()


def test_truncated_gzip(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": " a" * 50, "rejected": " b" * 50} for i in range(200)]
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{path}:\d+: <file>: truncated or corrupt gzip stream"):
        read_records(str(path))
    records, report = read_records(str(path), on_bad_record="skip")
    assert 0 < len(records) < 200 and len(report.bad) == 1
    assert report.bad[0].line == len(records) + 1  # the first line that could not be read
    assert [r.prompt for r in records] == [f"Q{i}" for i in range(len(records))]


def test_bad_parquet_rows_and_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "Q", "chosen": " a", "rejected": None}]), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e.parquet:2: rejected: is null"):
        read_records(str(tmp_path / "e.parquet"))
    (tmp_path / "f.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"f.parquet:0: <file>: not a readable Parquet file"):
        read_records(str(tmp_path / "f.parquet"))
