"""How much of the hardware a step uses: model FLOPs, the devices' peak FLOP/s, MFU, memory.

Shared by the trainer's logged metrics and the benchmark (``tools/bench.py``), so both count
the same way. Modules: ``flops`` (the 6N model-FLOP count and the MFU formula), ``peak``
(data-sheet and measured peaks), ``memory`` (peak RSS / device memory), ``utilisation`` (the
trainer's logged ``model_flops_per_second``, ``mfu`` and peak memory).
"""
