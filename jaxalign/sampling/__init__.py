"""Generation from a model's parameters: the decode loop (``decode``), one batch (``generate``)
and many prompts, ``n`` samples each, seeded, bucketed and sharded (``sample``)."""

from jaxalign.sampling.decode import FINISH_LENGTH, FINISH_STOP, Generation, decode, filter_logits, sample_tokens
from jaxalign.sampling.generate import generate
from jaxalign.sampling.sampler import Samples, SamplingConfig, sample

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "Generation", "Samples", "SamplingConfig", "decode", "filter_logits", "generate",
    "sample", "sample_tokens",
]
