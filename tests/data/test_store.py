"""The one on-disk store: streamed chunks, memory-mapped reads, atomic writes, checks on read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxalign.data.flat import FlatExamples
from jaxalign.data.store import ArrayStore, StoreError, read_arrays, read_store, save_examples, write_arrays


def test_write_then_read_memory_mapped(tmp_path):
    store = ArrayStore(tmp_path / "s")
    assert not store.exists()
    store.write({"ids": np.arange(6, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)})
    arrays = store.read()
    assert sorted(arrays) == ["empty", "ids"]
    assert isinstance(arrays["ids"], np.memmap) and arrays["ids"].tolist() == list(range(6))
    assert arrays["empty"].shape == (0, 3)
    store.write({"ids": np.arange(2)})  # replaces the whole store
    assert sorted(store.read()) == ["ids"] and store.read()["ids"].tolist() == [0, 1]


def test_a_failed_write_leaves_no_store_and_no_debris(tmp_path):
    class Boom:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("killed mid-write")

    store = ArrayStore(tmp_path / "s")
    with pytest.raises(RuntimeError, match="killed"):
        store.write({"a": np.arange(3), "b": Boom()})
    assert not store.exists() and os.listdir(tmp_path) == []


def test_chunks_grow_along_the_first_axis_and_keep_dtype_and_trailing_shape(tmp_path):
    chunks = [{"probs": np.full((2, 3), 0.5, np.float16), "ids": np.array([1, 2], np.int32)},
              {"probs": np.zeros((0, 3), np.float16)},
              {"probs": np.ones((1, 3), np.float16), "ids": np.array([3], np.int16)}]  # int16 widens safely
    write_arrays(str(tmp_path / "s"), chunks, lambda: {"counted": 3})
    arrays, meta = read_arrays(str(tmp_path / "s"))
    assert arrays["probs"].dtype == np.float16 and arrays["probs"].shape == (3, 3)
    np.testing.assert_array_equal(arrays["probs"][:, 0], [0.5, 0.5, 1.0])
    assert arrays["ids"].dtype == np.int32 and arrays["ids"].tolist() == [1, 2, 3]
    assert meta["counted"] == 3
    for i, bad in enumerate(({"probs": np.ones((1, 4), np.float16)}, {"ids": np.array([2**40])},
                             {"ids": np.float32([1])})):
        with pytest.raises(ValueError, match="a chunk of"):
            write_arrays(str(tmp_path / f"t{i}"), [chunks[0], bad])
    with pytest.raises(FileExistsError):
        write_arrays(str(tmp_path / "s"), chunks)


def test_damaged_stores_are_refused_naming_the_file(tmp_path):
    store = ArrayStore(tmp_path / "s")
    store.write({"a": np.arange(4, dtype=np.int64)}, {"note": "x"})
    assert store.meta()["note"] == "x"
    with open(tmp_path / "s" / "a.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(StoreError, match="a.bin"):
        store.read()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    (tmp_path / "s" / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(StoreError, match="version 1"):
        store.read()
    (tmp_path / "s" / "COMPLETE").unlink()
    assert not store.exists()
    with pytest.raises(StoreError, match="COMPLETE"):
        store.read()


def test_examples_round_trip_and_a_store_of_other_arrays_is_not_examples(tmp_path):
    examples = FlatExamples(tokens=np.arange(9, dtype=np.int32), starts=np.array([0, 4, 9]),
                            prompt_lens=np.array([2, 2], np.int32), has_bos=np.array([True, False]),
                            record_index=np.array([7]), sequences_per_example=2)
    save_examples(str(tmp_path / "e"), examples)
    back, meta = read_store(str(tmp_path / "e"))
    assert isinstance(back.tokens, np.memmap) and meta["sequences_per_example"] == 2
    assert back[0].rejected.ids.tolist() == [4, 5, 6, 7, 8] and back[0].index == 7
    save_examples(str(tmp_path / "f"), examples.take(np.array([0, 0])))  # a selection: its examples
    back, _ = read_store(str(tmp_path / "f"))
    assert len(back) == 2 and back.tokens.tolist() == 2 * list(range(9))
    ArrayStore(tmp_path / "g").write({"tokens": np.arange(3, dtype=np.int32)})
    with pytest.raises(StoreError, match="not a store of examples"):
        read_store(str(tmp_path / "g"))
