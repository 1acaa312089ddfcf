"""The data pipeline in one call: source spec + tokenizer -> ``Loader`` (train and eval).

``build_loader`` is the general entry point; ``build_loaders_from_config`` reads the trainer's
``config.data`` / ``config.loss`` / ``config.eval`` fields (``jaxalign/train/config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jaxalign.data.dataset import DataReport, EncodedDataset, OnBad, load_dataset
from jaxalign.data.formats import KeyMap
from jaxalign.data.truncation import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH
from jaxalign.data.loader import Loader

__all__ = ["Loaders", "build_loader", "build_loaders_from_config", "mask_for_loss"]


def mask_for_loss(loss_name: str) -> str:
    """DOVE scores the joint prompt + completion probability; every other loss the completion."""
    return "prompt_and_completion" if loss_name == "dove" else "completion"


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def loader_for(
    dataset: EncodedDataset,
    tokenizer: Any,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    **options: Any,
) -> Loader:
    """A ``Loader`` over ``dataset``; eval loaders (``train=False``) run one unshuffled epoch."""
    if not train:
        shuffle, num_epochs = False, 1
    return Loader(dataset, batch_size=batch_size, pad_id=_pad_id(tokenizer), seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, **options)


def build_loader(
    source: str,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int | None = DEFAULT_MAX_PROMPT_LENGTH,
    truncation_mode: str = "keep_start",
    format: str = "auto",
    keys: KeyMap = KeyMap(),
    family: Literal["preference", "sft"] = "preference",
    mask: str = "completion",
    packing: bool = False,
    buckets: tuple[int, ...] = (64, 128, 256, 512),
    pack_rows: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    train: bool = True,
    on_bad_record: OnBad = "error",
    shard_index: int | None = None,
    shard_count: int | None = None,
    encoder_options: dict[str, Any] | None = None,
    tfds_data_dir: str | None = None,
) -> Loader:
    """Reads, validates, tokenizes and truncates ``source``; returns its loader (see ``loader.report``)."""
    dataset = load_dataset(
        source, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode, format=format, keys=keys, on_bad_record=on_bad_record,
        family=family, encoder_options=encoder_options, tfds_data_dir=tfds_data_dir,
    )
    loader = loader_for(
        dataset, tokenizer, batch_size=batch_size, train=train, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        mask=mask, buckets=buckets, packing=packing, pack_length=max(buckets) if packing else None,
        pack_rows=pack_rows, shard_index=shard_index, shard_count=shard_count,
    )
    return loader


@dataclass
class Loaders:
    train: Loader
    eval: Loader | None
    report: DataReport


def build_loaders_from_config(
    config: Any, tokenizer: Any, *, shard_index: int | None = None, shard_count: int | None = None,
    row_multiple: int = 1,
) -> Loaders:
    """Train and eval loaders from the trainer's config.

    Uses ``config.seed``, ``config.data.{train, eval, eval_pairs, format, prompt_key,
    chosen_key, rejected_key, max_length, max_prompt_length, batch_size, micro_batch_size,
    packing, pack_rows, buckets, shuffle, on_bad_record}``, ``config.loss.name`` (``sft`` -> SFT examples; ``dove`` -> prompt +
    completion masks) and ``config.eval.batch_size``. The train loader yields micro-batches of
    ``micro_batch_size`` pairs (``batch_size`` when 0): a step consumes
    ``batch_size / micro_batch_size`` of them. Without ``data.eval`` the eval set is
    ``data.eval_pairs`` examples held out of ``data.train`` (seeded by ``config.seed``).
    Packed rows per batch are a multiple of ``row_multiple`` (the devices that split this
    process's rows).
    """
    d = config.data
    family = "sft" if config.loss.name == "sft" else "preference"
    common = dict(
        max_length=d.max_length, max_prompt_length=d.max_prompt_length, format=d.format,
        keys=KeyMap(d.prompt_key, d.chosen_key, d.rejected_key), on_bad_record=d.on_bad_record, family=family,
    )
    train_set = load_dataset(d.train, tokenizer, **common)
    report = train_set.report
    eval_set = None
    if d.eval:
        eval_set = load_dataset(d.eval, tokenizer, **common)
    elif d.eval_pairs:
        train_set, eval_set = train_set.split(d.eval_pairs, config.seed)
    options = dict(
        mask=mask_for_loss(config.loss.name), buckets=tuple(d.buckets), packing=d.packing,
        pack_length=max(d.buckets) if d.packing else None, shard_index=shard_index, shard_count=shard_count,
        row_multiple=row_multiple,
    )
    train = loader_for(train_set, tokenizer, batch_size=d.micro_batch_size or d.batch_size, train=True,
                       seed=config.seed, shuffle=d.shuffle, pack_rows=d.pack_rows or None, **options)
    evaluation = None
    if eval_set is not None:
        evaluation = loader_for(eval_set, tokenizer, batch_size=config.eval.batch_size, train=False, **options)
    return Loaders(train, evaluation, report)
