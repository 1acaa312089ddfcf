"""Scoring sequences with a model: per-token and per-sequence log-probs, scalar rewards."""
