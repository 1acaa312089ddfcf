"""The tokenized-data cache: an encoded dataset stored once under a key of everything it depends on.

The key hashes the source files' contents (in order; not their paths, so moved or copied data
still hits), the tokenizer (its serialised vocabulary, merges, normalizer, pre-tokenizer and
added tokens, special tokens, chat template), the format options, the training family, the
encoder options, the truncation limits and mode, the bad-record policy and this module's
version. Any change gives another key, hence another entry: a stale entry is never read.

An entry ``CACHE_DIR/KEY/`` is a ``jaxalign.data.store`` written to
``CACHE_DIR/.KEY.tmp-HOST-PID-RANDOM/`` and renamed into place after its files and
``COMPLETE`` marker are synced: a killed build leaves only a temporary directory (removed by
the next build on the same host once its process is gone), never an entry that looks
complete. An entry that fails to read (``StoreError``) is moved aside and rebuilt by a writer.

Only the *writer* (process 0 of a multi-process run) builds and writes; the others open the
entry after it (the trainer orders them with a barrier). A non-writer that finds no readable
entry (the cache directory is not shared with process 0) encodes in memory and says so.
Concurrent writers of one key (separate runs) each write their own temporary directory; the
first rename wins, the others open the winner's entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from jaxalign.data.flat import FlatExamples, join
from jaxalign.data.records import DataReport
from jaxalign.data.sources import resolve_source
from jaxalign.data.store import StoreError, read_store, sync_dir, write_store

__all__ = ["CACHE_VERSION", "cache_key", "cached", "default_cache_dir", "source_digests", "tokenizer_digest"]

log = logging.getLogger(__name__)

# Bump when what an entry holds for a key changes (encoding, truncation or storage rules).
CACHE_VERSION = 2


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jaxalign/data`` (``~/.cache/jaxalign/data``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxalign", "data")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def source_digests(spec: str) -> list[str] | None:
    """Content hashes of the files ``spec`` names, in order; ``None`` when it names a TFDS
    dataset (not cached: its files are not ours to hash)."""
    files = resolve_source(spec)
    if any(f.startswith("tfds:") for f in files):
        return None
    return [_file_digest(f) for f in files]


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what the tokenizer's ids and decoding depend on (not where it was loaded from)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    ident = [type(tokenizer).__name__, model, special, getattr(tokenizer, "chat_template", None),
             getattr(tokenizer, "clean_up_tokenization_spaces", None), getattr(tokenizer, "split_special_tokens", None)]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The entry name of ``parts`` (JSON-serialisable: sources, tokenizer, options)."""
    text = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _remove_dead_temporaries(cache_dir: str, key: str) -> None:
    """Temporary directories of ``key`` left by killed builds of this host."""
    prefix = f".{key}.tmp-{socket.gethostname()}-"
    for name in os.listdir(cache_dir):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _open(entry: str, files: list[str]) -> tuple[FlatExamples, DataReport]:
    """An entry's examples and report, its bad records named by the current source files."""
    examples, meta = read_store(entry)
    try:
        report = DataReport.from_json(meta["report"])
        report.bad = [replace(b, file=files[b.file]) if isinstance(b.file, int) else b for b in report.bad]
    except (KeyError, TypeError, IndexError) as e:
        raise StoreError(f"{entry}: meta.json has no usable report ({e})") from None
    return examples, report


def _as_stored(report: DataReport, files: list[str]) -> dict[str, Any]:
    """The report with each bad record's file replaced by its position among ``files``."""
    value = report.to_json()
    for b in value["bad"]:
        b["file"] = files.index(b["file"]) if b["file"] in files else b["file"]
    return value


def cached(
    cache_dir: str,
    parts: dict[str, Any],
    files: list[str],
    build: Callable[[DataReport], Iterable[FlatExamples]],
    sequences_per_example: int,
    *,
    write: bool,
) -> tuple[FlatExamples, DataReport]:
    """The examples and report of the entry for ``parts``, built first when missing.

    ``build(report)`` yields the examples in chunks and fills ``report`` as it goes; ``files``
    are the source files (bad records are stored by their position among them). A writer
    builds into a temporary directory and renames it into place; a non-writer that finds no
    readable entry builds in memory (module docstring).
    """
    key = cache_key(parts)
    entry = os.path.join(cache_dir, key)
    try:
        return _open(entry, files)
    except (StoreError, OSError) as e:
        missing = not os.path.exists(entry)
        if not missing:
            log.warning("data cache %s is unreadable (%s); %s", entry, e, "rebuilding it" if write else "not using it")
    if not write:
        if missing:
            log.warning("data cache %s is missing on this process (is data.cache_dir on a file system that "
                        "process 0 shares?); tokenizing here without writing it", entry)
        report = DataReport()
        return join(list(build(report)), sequences_per_example), report
    os.makedirs(cache_dir, exist_ok=True)
    _remove_dead_temporaries(cache_dir, key)
    if not missing:  # a broken entry: move it aside (atomically) before removing it
        aside = os.path.join(cache_dir, f".{key}.broken-{uuid.uuid4().hex}")
        os.replace(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)
    tmp = os.path.join(cache_dir, f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    report = DataReport()
    try:
        write_store(tmp, build(report), sequences_per_example,
                    lambda: {"key": key, "parts": parts, "report": _as_stored(report, files)})
        try:
            os.rename(tmp, entry)
        except OSError:  # another writer's entry is in place: use it
            if not os.path.isdir(entry):
                raise
        else:
            sync_dir(cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(entry, files)
