"""Performance benchmarks: jaxalign's DPO step next to TRL's DPOTrainer (``tools/bench.py``).

The FLOP count, MFU, peaks and memory statistics it reports come from ``jaxalign.perf``, as
the trainer's logged metrics do. Modules: ``peak`` (the peak-FLOP/s worker), ``workload`` (shared model and pairs), ``ours`` /
``trl_side`` (the two trainers as worker processes), ``session`` (interleaved windows),
``report`` (rates, ratios, tables), ``main`` (the command). Importing this package
imports neither JAX nor PyTorch: workers import their framework after setting their
environment.
"""
