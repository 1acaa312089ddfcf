"""Caches of numbers computed once before training and keyed by a fingerprint of their inputs:
precomputed reference log-probs (``reference``), VPO calibration samples (``calibration``).
``fingerprint`` holds the digests, ``store`` the one on-disk format (atomic, memory-mapped)."""
