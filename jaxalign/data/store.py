"""``FlatExamples`` on disk: raw little-endian arrays, memory-mapped when read.

A store is a directory holding ``tokens.bin`` (int32), ``starts.bin`` (int64),
``prompt_lens.bin`` (int32), ``has_bos.bin`` (bool), ``record_index.bin`` (int64) (the fields of
``FlatExamples``), ``meta.json`` (counts, format version and the writer's own entries) and,
written last, the marker ``COMPLETE``. ``write_store`` streams chunks into a new directory and
syncs every file before the marker; ``read_store`` refuses (``StoreError`` naming the file) a
directory without the marker, of another version, or whose files do not match the counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from jaxalign.data.flat import FlatExamples

__all__ = ["MARKER", "StoreError", "read_store", "sync_dir", "write_store"]

STORE_VERSION = 1
MARKER = "COMPLETE"
META = "meta.json"
ARRAYS: dict[str, np.dtype] = {
    "tokens": np.dtype("<i4"), "starts": np.dtype("<i8"), "prompt_lens": np.dtype("<i4"),
    "has_bos": np.dtype("bool"), "record_index": np.dtype("<i8"),
}


class StoreError(ValueError):
    """A directory that is not a complete, consistent store."""


def sync_dir(path: str) -> None:
    """Makes the directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_store(directory: str, chunks: Iterable[FlatExamples], sequences_per_example: int,
                meta: Callable[[], dict[str, Any]]) -> None:
    """Writes ``chunks`` one after the other into the new ``directory``; ``meta()`` (called after
    the last chunk, so it may report what producing them counted) goes into ``meta.json``."""
    os.makedirs(directory)
    files = {name: open(os.path.join(directory, f"{name}.bin"), "wb") for name in ARRAYS}
    counts = dict.fromkeys(ARRAYS, 0)
    try:
        files["starts"].write(np.zeros(1, ARRAYS["starts"]).tobytes())
        counts["starts"] = 1
        for chunk in chunks:
            if chunk.sequences_per_example != sequences_per_example:
                raise ValueError(f"a chunk of {chunk.sequences_per_example}-sequence examples in a store of "
                                 f"{sequences_per_example}-sequence ones")
            arrays = {"tokens": chunk.tokens, "starts": chunk.starts[1:] + counts["tokens"],
                      "prompt_lens": chunk.prompt_lens, "has_bos": chunk.has_bos, "record_index": chunk.record_index}
            for name, value in arrays.items():
                files[name].write(np.ascontiguousarray(value, ARRAYS[name]).tobytes())
                counts[name] += len(value)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    record = {"version": STORE_VERSION, "counts": counts, "sequences_per_example": sequences_per_example, **meta()}
    for name, text in ((META, json.dumps(record, indent=1)), (MARKER, "")):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    sync_dir(directory)


def read_store(directory: str) -> tuple[FlatExamples, dict[str, Any]]:
    """The store's examples (memory-mapped, read-only) and its ``meta.json``."""
    if not os.path.isfile(os.path.join(directory, MARKER)):
        raise StoreError(f"{directory}: no {MARKER} marker (an unfinished or interrupted write)")
    path = os.path.join(directory, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        counts, spe = meta["counts"], meta["sequences_per_example"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if meta.get("version") != STORE_VERSION:
        raise StoreError(f"{path}: store version {meta.get('version')!r}, this code reads {STORE_VERSION}")
    arrays = {}
    for name, dtype in ARRAYS.items():
        path = os.path.join(directory, f"{name}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != counts.get(name, -1) * dtype.itemsize:
            raise StoreError(f"{path}: {size} bytes, expected {counts.get(name)} {dtype} values")
        arrays[name] = np.memmap(path, dtype, mode="r") if size else np.zeros(0, dtype)
    starts, n = arrays["starts"], counts["record_index"]
    if (spe not in (1, 2) or counts["prompt_lens"] != n * spe or counts["has_bos"] != n * spe
            or counts["starts"] != n * spe + 1 or starts[0] != 0 or starts[-1] != counts["tokens"]
            or np.any(np.diff(starts) < 0)):
        raise StoreError(f"{directory}: the arrays' counts and offsets are inconsistent")
    return FlatExamples(sequences_per_example=spe, **arrays), meta
