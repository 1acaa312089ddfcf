"""Performance benchmarks: jaxalign's DPO step next to TRL's DPOTrainer (``tools/bench.py``).

Modules: ``flops`` (the 6N model-FLOP count and MFU), ``peak`` (measured/vendor peak
FLOP/s), ``memory`` (peak RSS / device memory) (these three also give the trainer's logged
metrics, ``jaxalign.train.utilisation``), ``workload`` (shared model and pairs), ``ours`` /
``trl_side`` (the two trainers as worker processes), ``session`` (interleaved windows),
``report`` (rates, ratios, tables), ``main`` (the command). Importing this package
imports neither JAX nor PyTorch: workers import their framework after setting their
environment.
"""
