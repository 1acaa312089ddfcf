"""The one on-disk store: named arrays in a directory, streamed in when written, memory-mapped
when read. The tokenized-data cache, the reference, teacher, advantage and generation caches and
the online driver's rounds all keep their arrays in it.

A store directory holds ``NAME.bin`` per array (raw bytes in C order, little-endian),
``meta.json`` (format version, each array's dtype and shape, the writer's own entries) and,
written last, the marker ``COMPLETE``.

* ``write_arrays`` streams chunks (dicts of arrays; each array grows along its first axis) into
  a new directory and syncs every file before the marker; ``read_arrays`` refuses
  (``StoreError`` naming the file) a directory without the marker, of another version, or whose
  files do not match ``meta.json``, and maps the arrays read-only: pages are read from disk as
  they are touched, so a store need not fit in host memory.
* ``ArrayStore(path)`` writes into a temporary sibling directory and renames it into place: a
  killed write never leaves a store that looks complete (only a ``.tmp-*`` directory).
* ``write_store`` / ``read_store`` / ``save_examples`` keep ``FlatExamples`` (``tokens``,
  ``starts``, ``prompt_lens``, ``has_bos``, ``record_index``, ``sequences_per_example`` in the
  meta), checking their counts and offsets when read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jaxalign.data.flat import FlatExamples, flatten

__all__ = ["MARKER", "ArrayStore", "StoreError", "read_arrays", "read_store", "save_examples", "sync_dir",
           "write_arrays", "write_store"]

STORE_VERSION = 2
MARKER = "COMPLETE"
META = "meta.json"
EXAMPLE_ARRAYS: dict[str, np.dtype] = {
    "tokens": np.dtype("<i4"), "starts": np.dtype("<i8"), "prompt_lens": np.dtype("<i4"),
    "has_bos": np.dtype("bool"), "record_index": np.dtype("<i8"),
}
Chunk = Mapping[str, np.ndarray]


class StoreError(ValueError):
    """A directory that is not a complete, consistent store."""


def sync_dir(path: str) -> None:
    """Makes the directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_arrays(directory: str, chunks: Iterable[Chunk],
                 meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = ()) -> None:
    """Writes ``chunks`` one after the other into the new (or empty) ``directory``: an array's
    chunks are concatenated along their first axis and must agree in dtype and trailing shape.
    ``meta`` (or ``meta()``, called after the last chunk, so it may report what producing them
    counted) goes into ``meta.json``."""
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        raise FileExistsError(f"{directory}: a store is written into a new, empty directory")
    files: dict[str, Any] = {}
    spec: dict[str, dict[str, Any]] = {}
    try:
        for chunk in chunks:
            for name, value in chunk.items():
                value = np.asarray(value)
                if name not in spec:
                    if not name.isidentifier() or value.ndim == 0:
                        raise ValueError(f"store array {name!r}: names are identifiers, arrays have an axis to grow")
                    dtype = value.dtype.newbyteorder("<")
                    spec[name] = {"dtype": dtype.str, "shape": [0, *value.shape[1:]]}
                    files[name] = open(os.path.join(directory, f"{name}.bin"), "wb")
                entry = spec[name]
                if list(value.shape[1:]) != entry["shape"][1:] or not np.can_cast(value.dtype, entry["dtype"]):
                    raise ValueError(f"store array {name!r}: a chunk of {value.dtype} {value.shape} after "
                                     f"{entry['dtype']} [N, {', '.join(map(str, entry['shape'][1:]))}]")
                np.ascontiguousarray(value, entry["dtype"]).tofile(files[name])
                entry["shape"][0] += len(value)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    extra = dict(meta() if callable(meta) else meta)
    _write_synced(os.path.join(directory, META), json.dumps({"version": STORE_VERSION, "arrays": spec, **extra},
                                                            indent=1))
    _write_synced(os.path.join(directory, MARKER), "")
    sync_dir(directory)


def read_arrays(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The store's arrays (memory-mapped, read-only; in memory when empty) and its ``meta.json``."""
    if not os.path.isfile(os.path.join(directory, MARKER)):
        raise StoreError(f"{directory}: no {MARKER} marker (an unfinished or interrupted write)")
    path = os.path.join(directory, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        spec = {name: (np.dtype(s["dtype"]), tuple(int(n) for n in s["shape"])) for name, s in meta["arrays"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if meta.get("version") != STORE_VERSION:
        raise StoreError(f"{path}: store version {meta.get('version')!r}, this code reads {STORE_VERSION}")
    arrays = {}
    for name, (dtype, shape) in spec.items():
        path = os.path.join(directory, f"{name}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != int(np.prod(shape)) * dtype.itemsize:
            raise StoreError(f"{path}: {size} bytes, expected {dtype} values of shape {list(shape)}")
        arrays[name] = np.memmap(path, dtype, mode="r", shape=shape) if size else np.zeros(shape, dtype)
    return arrays, meta


class ArrayStore:
    """Named arrays under ``path`` (a directory), written atomically (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def exists(self) -> bool:
        """Whether a complete store is at ``path``."""
        return os.path.isfile(os.path.join(self.path, MARKER))

    def write(self, arrays: Chunk | Iterable[Chunk], meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = ()
              ) -> None:
        """Writes ``arrays`` (one dict, or chunks of them) and ``meta``, replacing what is at ``path``."""
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.path)}-", dir=parent)
        try:
            write_arrays(tmp, [arrays] if isinstance(arrays, Mapping) else arrays, meta)
            if os.path.exists(self.path):
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
            sync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read(self) -> dict[str, np.ndarray]:
        """The stored arrays, memory-mapped; ``StoreError`` if there is no complete store."""
        return read_arrays(self.path)[0]

    def meta(self) -> dict[str, Any]:
        return read_arrays(self.path)[1]


def _example_chunks(chunks: Iterable[FlatExamples], sequences_per_example: int) -> Iterable[Chunk]:
    """The store chunks of ``chunks`` (starts offset by the tokens before each; a selection's
    examples copied out)."""
    yield {name: np.zeros(1 if name == "starts" else 0, dtype) for name, dtype in EXAMPLE_ARRAYS.items()}
    tokens = 0
    for chunk in chunks:
        if chunk.sequences_per_example != sequences_per_example:
            raise ValueError(f"a chunk of {chunk.sequences_per_example}-sequence examples in a store of "
                             f"{sequences_per_example}-sequence ones")
        if chunk.select is not None:  # a selection: its examples, copied out
            chunk = flatten(chunk, sequences_per_example)
        yield {"tokens": chunk.tokens, "starts": chunk.starts[1:] + tokens, "prompt_lens": chunk.prompt_lens,
               "has_bos": chunk.has_bos, "record_index": chunk.record_index}
        tokens += len(chunk.tokens)


def write_store(directory: str, chunks: Iterable[FlatExamples], sequences_per_example: int,
                meta: Callable[[], dict[str, Any]] = dict) -> None:
    """Writes the examples of ``chunks`` one after the other into the new ``directory``
    (``write_arrays``; ``meta()`` is called after the last chunk)."""
    write_arrays(directory, _example_chunks(chunks, sequences_per_example),
                 lambda: {"sequences_per_example": sequences_per_example, **meta()})


def save_examples(path: str, examples: FlatExamples) -> None:
    """Writes ``examples`` as a store at ``path`` atomically (``ArrayStore``)."""
    spe = examples.sequences_per_example
    ArrayStore(path).write(_example_chunks([examples], spe), {"sequences_per_example": spe})


def read_store(directory: str) -> tuple[FlatExamples, dict[str, Any]]:
    """The store's examples (memory-mapped, read-only) and its ``meta.json``."""
    arrays, meta = read_arrays(directory)
    spe = meta.get("sequences_per_example")
    if sorted(arrays) != sorted(EXAMPLE_ARRAYS) or any(arrays[k].dtype != d for k, d in EXAMPLE_ARRAYS.items()):
        raise StoreError(f"{directory}: not a store of examples (arrays {sorted(arrays)})")
    starts, n = arrays["starts"], len(arrays["record_index"])
    if (spe not in (1, 2) or len(arrays["prompt_lens"]) != n * spe or len(arrays["has_bos"]) != n * spe
            or len(starts) != n * spe + 1 or starts[0] != 0 or starts[-1] != len(arrays["tokens"])
            or np.any(np.diff(starts) < 0)):
        raise StoreError(f"{directory}: the arrays' counts and offsets are inconsistent")
    return FlatExamples(sequences_per_example=spe, **arrays), meta
