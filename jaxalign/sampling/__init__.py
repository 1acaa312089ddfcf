"""Generation with a KV cache: ``generate(model, prompt_ids, prompt_mask, ...) -> Generation``."""

from jaxalign.sampling.generate import Generation, filter_logits, generate, sample_tokens

__all__ = ["Generation", "filter_logits", "generate", "sample_tokens"]
