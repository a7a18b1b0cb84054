"""The duplicate-key check that stands in for a primary key on point_steps."""

from __future__ import annotations

import numpy as np

from dpledger.ingest.load import first_duplicate


def _naive(columns):
    seen = {}
    for i, key in enumerate(zip(*columns)):
        if key in seen:
            return seen[key], i
        seen[key] = i
    return None


def test_first_duplicate_matches_a_dictionary_scan():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        cols = [rng.integers(0, 5, n), rng.integers(0, 7, n)]
        if trial % 3 == 0:  # sorted, unique rows: the fast path
            keys = sorted(set(zip(*cols)))
            cols = [np.array([k[0] for k in keys]), np.array([k[1] for k in keys])]
        cols = [c.astype(np.int64) for c in cols]
        assert first_duplicate(cols) == _naive(cols)


def test_keys_too_wide_to_pack_use_lexsort():
    big = np.array([2**40, 2**40, 5, 2**40], dtype=np.int64)
    other = np.array([2**30, 7, 7, 2**30], dtype=np.int64)
    third = np.array([1, 1, 1, 1], dtype=np.int64) * 2**20
    assert first_duplicate([big, other, third]) == (0, 3)
    assert first_duplicate([big[:3], other[:3], third[:3]]) is None
