"""Reward models as Hugging Face sequence-classification checkpoints (``num_labels=1``).

Our reward is ``r = h_last . w``: the bias-free head ``{"kernel": [D]}`` applied to the final
hidden state of a sequence's last token. HF's ``*ForSequenceClassification`` computes
``h @ score.weight.T`` (``score = Linear(D, 1, bias=False)``) at each row's rightmost token
whose id is not ``config.pad_token_id``. ``save_pretrained(model, dir, reward_head=w)`` writes
the backbone and ``score.weight = w[None]`` (``hf_names.reward_mappings``);
``load_reward_model(dir)`` reads both back.

Pad/EOS parity. Training sequences end with the EOS the ``Encoder`` appends and the reward is
read there, so the export's ``config.pad_token_id`` is never an EOS id
(``reward_pad_token``):

1. the tokenizer's pad token when it is not an EOS token (the BPE tokenizers of
   ``jaxalign.tokenizers``, Qwen2.5-Instruct);
2. else, when the embedding has a row no token uses (``len(tokenizer) < vocab_size``), a new
   special token ``<|reward_pad|>`` on that row, which becomes the exported tokenizer's pad
   token (so HF pipelines pad with it);
3. else none (``pad_token_id: null``, a warning): HF then reads each row's last position, the
   EOS of one unpadded sequence, and refuses batches of more than one row.

``jaxalign.scoring.reward_model.RewardModel`` does not depend on pad ids: it finds the last
real token from its own masks, as training does.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import ModelConfig, to_hf_config
from jaxalign.models.errors import CheckpointError
from jaxalign.models.hf_import import CheckpointTensors, ShardingFn, from_pretrained
from jaxalign.models.hf_names import SEQUENCE_CLASSIFIERS, is_sequence_classifier, score_mapping

REWARD_PAD_TOKEN = "<|reward_pad|>"

log = logging.getLogger(__name__)


def _eos_ids(cfg: ModelConfig, tokenizer: Any | None) -> set[int]:
    eos = cfg.eos_token_id
    ids = set(eos) if isinstance(eos, tuple) else {eos}
    if tokenizer is not None:
        ids.add(tokenizer.eos_token_id)
    return ids - {None}


def reward_pad_token(tokenizer: Any | None, cfg: ModelConfig) -> tuple[Any | None, int | None]:
    """``(tokenizer to save, config.pad_token_id)`` of a reward-model export: a pad id that is
    no EOS id, or None (see the module docstring). The given tokenizer is never modified."""
    eos = _eos_ids(cfg, tokenizer)
    pad = cfg.pad_token_id if tokenizer is None else tokenizer.pad_token_id
    if pad is not None and pad not in eos:
        return tokenizer, pad
    if tokenizer is not None and len(tokenizer) < cfg.vocab_size:
        padded = copy.deepcopy(tokenizer)
        padded.add_special_tokens({"pad_token": REWARD_PAD_TOKEN})
        if len(tokenizer) <= padded.pad_token_id < cfg.vocab_size:
            log.info("reward model export: the tokenizer's pad token is an EOS token (or missing); the exported "
                     "tokenizer pads with the new %s (id %d)", REWARD_PAD_TOKEN, padded.pad_token_id)
            return padded, padded.pad_token_id
    log.warning(
        "reward model export: no pad token distinct from EOS, and no tokenizer or unused embedding row to add one; "
        "config.pad_token_id is null, so transformers scores one unpadded sequence at a time (its last token)"
    )
    return tokenizer, None


def reward_hf_config(cfg: ModelConfig, pad_token_id: int | None):
    """The ``transformers`` config of the family's ``*ForSequenceClassification`` with
    ``num_labels=1`` and ``pad_token_id``."""
    hf = to_hf_config(cfg)
    hf.architectures = [SEQUENCE_CLASSIFIERS[cfg.family]]
    hf.num_labels = 1
    hf.pad_token_id = pad_token_id
    return hf


def load_reward_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      sharding_fn: ShardingFn | None = None, query_block: int = 128) -> tuple[CausalLM, np.ndarray]:
    """``(decoder, head kernel [D] float32)`` of the local HF sequence-classification checkpoint
    ``path`` (``num_labels=1``). The decoder's LM head is tied to its embedding (the checkpoint
    has none); options as for ``from_pretrained``. Raises ``CheckpointError`` for a checkpoint
    that is not a one-label sequence classifier."""
    from transformers import AutoConfig

    path = Path(path)
    model = from_pretrained(path, dtype=dtype, param_dtype=param_dtype, sharding_fn=sharding_fn,
                            query_block=query_block)
    hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if not is_sequence_classifier(hf.architectures):
        raise CheckpointError(
            f"{path / 'config.json'}: architectures={hf.architectures} is not a sequence-classification model; a "
            "reward model is a *ForSequenceClassification checkpoint with num_labels=1 (what a bradley_terry run "
            "exports to WORKDIR/export)"
        )
    if hf.num_labels != 1:
        raise CheckpointError(f"{path / 'config.json'}: num_labels={hf.num_labels}; a reward model has num_labels=1")
    head, _ = CheckpointTensors(path).read(score_mapping(model.config))
    return model, np.asarray(head, np.float32)
