"""Caches of numbers computed once before training and keyed by a fingerprint of their inputs:
precomputed reference log-probs (``reference``), completions sampled once per example
(``generations``: VPO calibration samples in ``calibration``, ADPA's states), and the teachers'
top-k and advantages of distillation (``teacher``). ``fingerprint`` holds the digests, ``store``
the one on-disk format (atomic, memory-mapped)."""
