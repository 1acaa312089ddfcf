"""Distillation pipelines (ADPA+, the distillation quickstart): chains of offline runs."""
