"""Model FLOPs of a DPO train step, and model FLOP utilisation (MFU).

Convention (Kaplan et al. 2020; PaLM appendix B): a matmul with a ``[D_in, D_out]`` weight
costs ``2 * D_in * D_out`` FLOPs per token forward and twice that backward. So with

    N = (parameters of the decoder blocks and the final norm) + D * V (the unembedding matmul)

a token costs ``2N`` FLOPs through a forward pass and ``6N`` through forward + backward.
The input embedding is a table lookup (no FLOPs) and is not in ``N``; the unembedding is
counted even when it is tied to the input embedding, because the matmul is done either way.
Attention's score and value products (``4 * layers * d_attn * context`` per token forward)
are left out of ``N``, as in the 6N convention; ``attention_flops_per_token`` gives them for
reference.

A DPO step on ``T`` real (non-padding) tokens does ``6 N T`` for the policy and, with the
reference computed in the step, ``2 N T`` more: ``model_flops = (6 + 2 * on_the_fly) N T``.
Padding tokens, activation recomputation (remat) and the extra forward of gradient
checkpointing are *not* counted: MFU measures useful work only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ParamCounts",
    "attention_flops_per_token",
    "mfu",
    "param_counts",
    "train_flops_per_token",
]

# Parameter-path fragments of the input embedding tables (Llama family, GPT-2).
_EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a decoder, split by how they enter the FLOP count."""

    total: int  # every stored parameter
    embedding: int  # input embedding tables (lookups: no FLOPs)
    blocks: int  # decoder layers and the final norm
    unembedding: int  # hidden_size * vocab_size: the LM-head matmul (tied or not)
    lm_head_stored: int  # parameters of a separate (untied) LM head, 0 when tied

    @property
    def flop_params(self) -> int:
        """``N`` of the 6N rule: blocks + the unembedding matmul."""
        return self.blocks + self.unembedding


def param_counts(config) -> ParamCounts:
    """Counts of a ``jaxalign.models.ModelConfig``, read from the model's abstract parameters
    (shapes only, no memory), so every family and option is counted as it is built."""
    from flax import nnx

    from jaxalign.models import abstract_model

    state = nnx.state(abstract_model(config), nnx.Param)
    total = embedding = lm_head = 0
    for path, leaf in nnx.to_flat_state(state):
        size = int(np.prod(leaf.shape))
        names = [str(p) for p in path]
        total += size
        if any(n in _EMBEDDING_NAMES for n in names):
            embedding += size
        elif "lm_head" in names:
            lm_head += size
    return ParamCounts(
        total=total,
        embedding=embedding,
        blocks=total - embedding - lm_head,
        unembedding=config.hidden_size * config.vocab_size,
        lm_head_stored=lm_head,
    )


def train_flops_per_token(flop_params: int, *, reference_on_the_fly: bool) -> int:
    """``6N`` (policy forward + backward) plus ``2N`` when the reference runs in the step."""
    return (6 + (2 if reference_on_the_fly else 0)) * flop_params


def attention_flops_per_token(config, context: float) -> float:
    """Forward FLOPs per token of the attention products ``QK^T`` and ``PV`` (not in ``N``):
    ``4 * layers * heads * head_dim * context`` for an average attended ``context``."""
    return 4.0 * config.num_layers * config.num_heads * config.head_dim * context


def mfu(model_flops_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the devices' peak FLOP/s (the one
    MFU formula of the trainer's metrics and the benchmark's report)."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"mfu needs a positive peak FLOP/s, got {peak_flops_per_second}")
    return model_flops_per_second / peak_flops_per_second
