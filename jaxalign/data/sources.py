"""Raw rows from JSONL (plain or .gz), Parquet and TensorFlow Datasets, with their locations.

A *source spec* is a comma-separated list of items, each one of

* a file path or glob: ``*.jsonl``, ``*.jsonl.gz``, ``*.parquet``;
* a directory: every such file inside it, sorted by name;
* ``tfds:NAME[:SPLIT]``: a TFDS dataset prepared in ``array_record`` or ``parquet`` form, read
  with ``tfds.data_source`` (random access, no TensorFlow); SPLIT defaults to ``train`` and
  the data directory to ``$TFDS_DATA_DIR`` or ``tfds_data_dir``.

``iter_rows`` yields ``(file, line, row)`` where ``row`` is the decoded object or a
``FieldError`` for a row that could not be read (not JSON, non-UTF-8 bytes, a truncated or
corrupt gzip stream: that error ends the file). ``line`` is the 1-based line (JSONL), row
(Parquet) or element index + 1 (TFDS).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.data.records import FieldError

__all__ = ["SourceError", "iter_rows", "resolve_source"]

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class SourceError(ValueError):
    """A source spec that names nothing readable (missing file, unknown type)."""


def _kind(path: str) -> str:
    for suffix in FILE_SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise SourceError(f"{path}: unknown file type (expected one of {', '.join(FILE_SUFFIXES)})")


def resolve_source(spec: str) -> list[str]:
    """The files (and ``tfds:`` items) a spec names, in order; ``SourceError`` if one is missing."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise SourceError("empty data source spec")
    out: list[str] = []
    for item in items:
        if item.startswith("tfds:"):
            out.append(item)
            continue
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).iterdir() if p.is_file() and p.name.endswith(FILE_SUFFIXES)
            )
            if not found:
                raise SourceError(f"{item}: directory holds no {', '.join(FILE_SUFFIXES)} files")
            out += found
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise SourceError(f"{item}: no file matches this pattern")
        for path in matches:
            if not os.path.isfile(path):
                raise SourceError(f"{path}: no such file")
            _kind(path)
            out.append(path)
    return out


def _jsonl_rows(path: str) -> Iterator[tuple[str, int, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    line = 0
    try:
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield path, line, FieldError("<line>", f"non-UTF-8 bytes at byte {e.start} of the line")
                    continue
                if not text.strip():
                    continue
                try:
                    yield path, line, json.loads(text)
                except json.JSONDecodeError as e:
                    yield path, line, FieldError("<line>", f"not JSON: {e.msg} (column {e.colno})")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        yield path, line + 1, FieldError("<file>", f"truncated or corrupt gzip stream ({e}); rows from here on are lost")


def _parquet_rows(path: str) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield path, 0, FieldError("<file>", f"not a readable Parquet file ({e})")
        return
    line = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            line += 1
            yield path, line, row


def _from_tfds(value: Any, field: str) -> Any:
    """Converts a TFDS element (bytes, numpy arrays, dicts of sequences) to JSON-like values."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FieldError(field, f"non-UTF-8 bytes at byte {e.start}") from None
    if isinstance(value, np.ndarray):
        return [_from_tfds(v, f"{field}[{i}]") for i, v in enumerate(value.tolist())] if value.ndim else _from_tfds(value.item(), field)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        out = {k: _from_tfds(v, f"{field}.{k}" if field else k) for k, v in value.items()}
        # A Sequence of message dicts arrives as a dict of equal-length lists.
        if set(out) == {"role", "content"} and isinstance(out["role"], list):
            return [{"role": r, "content": c} for r, c in zip(out["role"], out["content"])]
        return out
    if isinstance(value, list):
        return [_from_tfds(v, f"{field}[{i}]") for i, v in enumerate(value)]
    return value


def _tfds_rows(item: str, data_dir: str | None) -> Iterator[tuple[str, int, Any]]:
    import tensorflow_datasets as tfds

    parts = item[len("tfds:"):].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
        raise SourceError(f"{item}: cannot open TFDS dataset {name!r} split {split!r} in {data_dir!r}: {e}") from e
    for i in range(len(source)):
        try:
            row = _from_tfds(source[i], "")
        except FieldError as e:
            row = e
        yield item, i + 1, row


def iter_rows(spec: str, *, tfds_data_dir: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """``(file, line, row_or_FieldError)`` for every row of every item of ``spec``, in order."""
    for item in resolve_source(spec):
        if item.startswith("tfds:"):
            yield from _tfds_rows(item, tfds_data_dir)
        elif item.endswith(".parquet"):
            yield from _parquet_rows(item)
        else:
            yield from _jsonl_rows(item)
