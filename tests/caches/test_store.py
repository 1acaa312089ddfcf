"""The caches' on-disk store: atomic writes, memory-mapped reads, and caches round-tripped through it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxalign.caches.reference import ReferenceCache
from jaxalign.caches.store import ArrayStore


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


def test_reference_cache_round_trip_and_lookup(tmp_path):
    cache = ReferenceCache(np.array([5, 2, 9]), np.array([-1.0, -2.0, -3.0], np.float32),
                           np.array([-4.0, -5.0, -6.0], np.float32))
    cache.save(str(tmp_path / "c"))
    loaded = ReferenceCache.load(str(tmp_path / "c"))
    assert loaded.calibration is None
    got = loaded.lookup(np.array([[9, -1], [2, 5]]))
    np.testing.assert_array_equal(got["ref_chosen_logps"], [[-3.0, 0.0], [-2.0, -1.0]])
    np.testing.assert_array_equal(got["ref_rejected_logps"], [[-6.0, 0.0], [-5.0, -4.0]])
    with pytest.raises(KeyError, match=r"example_index \[7\]"):
        loaded.lookup(np.array([7]))
