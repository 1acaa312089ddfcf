"""Process-level concerns of a long run, independent of what it trains: stop signals and their
agreement over processes (``preemption``), JAX's persistent compilation cache
(``compilation_cache``), ``jax.profiler`` traces of chosen steps (``profiling``), malloc's
transparent huge pages (``huge_pages``).
"""
