"""Caches round-tripped through the on-disk store (``jaxalign.data.store``)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxalign.caches.reference import ReferenceCache


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
