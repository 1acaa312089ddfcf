"""python -m jaxalign.data.check: counts per format, bad records, token lengths, exit status 0/1/2."""

import io
import json
import subprocess
import sys

from jaxalign.data import Encoder, read_records
from jaxalign.data.check import main
from jaxalign.data.truncation import truncate

GOOD = [
    {"prompt": "Q", "chosen": " a", "rejected": " b"},
    {"prompt": "Q2", "chosen": " c", "rejected": " d"},
    {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b"},
]


def run(*argv):
    out = io.StringIO()
    return main([str(a) for a in argv], out=out), out.getvalue()


def test_clean_file_exits_0(tmp_path):
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    rc, out = run(path)
    assert rc == 0
    assert "rows read: 3\nrecords per format:\n  standard: 2\n  implicit: 1\nbad records: 0" in out


def test_bad_records_and_token_report_exit_1(hh_path, bpe_tokenizer_dir, bpe_tokenizer):
    rc, out = run(hh_path, "--tokenizer", bpe_tokenizer_dir, "--max-length", 64, "--max-prompt-length", 32)
    assert rc == 1
    assert "records per format:\n  implicit: 199\n" in out
    assert f"bad records: 1\n  {hh_path}:87: chosen: empty\n" in out
    assert "  prompt                 n=199 " in out and "  completion (rejected)  n=199 " in out
    # The report counts exactly the pairs the trainer's truncation drops.
    records, _ = read_records(str(hh_path), on_bad_record="skip")
    enc = Encoder(bpe_tokenizer)
    drops = sum(truncate(enc.encode_pair(r), max_length=64, max_prompt_length=32, mode="keep_start") is None
                for r in records)
    assert f"(max_length=64, max_prompt_length=32, mode=keep_start): {drops} of 199 examples would be dropped" in out
    rc, out = run(hh_path, "--tokenizer", bpe_tokenizer_dir, "--max-length", 64, "--max-prompt-length", 32,
                  "--truncation-mode", "keep_end")
    assert "0 of 199 examples would be dropped" in out


def test_many_bad_records_are_listed_then_totalled(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 12 + json.dumps(GOOD[0]) + "\n")
    rc, out = run(path, "--show", 2)
    assert rc == 1
    assert f"bad records: 12\n  {path}:1: <line>: not JSON: " in out and f"\n  {path}:2: <line>:" in out
    assert f"{path}:3:" not in out and "  ... and 10 more" in out


def test_unusable_arguments_exit_2(tmp_path, capsys):
    path = tmp_path / "clean.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n")
    assert run(tmp_path / "missing.jsonl")[0] == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert run(path, "--tokenizer", tmp_path / "no-tokenizer")[0] == 2
    assert "--tokenizer:" in capsys.readouterr().err
    assert run(path, "--max-length", 16, "--max-prompt-length", 16)[0] == 2
    assert "max_prompt_length must lie in" in capsys.readouterr().err
    assert run(path, "--format", "csv")[0] == 2
    assert "invalid choice: 'csv'" in capsys.readouterr().err


def test_no_usable_record_is_an_error_as_in_the_trainer(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert run(path)[0] == 1
    assert "no usable record: the trainer would refuse this data" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    proc = subprocess.run([sys.executable, "-m", "jaxalign.data.check", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"{path}:2: <line>: non-UTF-8 bytes at byte 12 of the line" in proc.stdout
