"""The data pipeline in one call: source spec + tokenizer -> ``Loader`` (train and eval).

``build_loader`` is the general entry point; ``build_loaders_from_config`` reads the trainer's
``config.data`` / ``config.loss`` / ``config.eval`` fields (``jaxalign/train/config.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from jaxalign.data.cache import default_cache_dir
from jaxalign.data.dataset import DataReport, EncodedDataset, load_dataset
from jaxalign.data.records import OnBad
from jaxalign.data.formats import KeyMap
from jaxalign.data.truncation import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH
from jaxalign.data.loader import Loader

__all__ = ["CACHE_OFF", "Loaders", "build_loader", "build_loaders_from_config", "cache_location", "mask_for_loss"]

CACHE_OFF = "none"
T = TypeVar("T")


def cache_location(cache_dir: str) -> str | None:
    """``data.cache_dir`` resolved: ``""`` = ``default_cache_dir()``, ``"none"`` = no cache (``None``)."""
    if cache_dir == CACHE_OFF:
        return None
    return cache_dir or default_cache_dir()


def writer_first(build: Callable[[], T], *, writer: bool, barrier: Callable[[], None]) -> T:
    """``build()`` on the cache writer, then ``barrier()``, then on the others (which open what
    the writer wrote). A failure of the writer is raised after the barrier, so that the others
    are not left waiting; they then build (and fail) on their own."""
    result, error = None, None
    if writer:
        try:
            result = build()
        except Exception as e:  # re-raised below, once the others passed the barrier
            error = e
    barrier()
    if error is not None:
        raise error
    return result if writer else build()


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
    cache_dir: str | None = None,
) -> Loader:
    """Reads, validates, tokenizes and truncates ``source`` (through the tokenized cache in
    ``cache_dir`` when given); returns its loader (see ``loader.report``)."""
    dataset = load_dataset(
        source, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode, format=format, keys=keys, on_bad_record=on_bad_record,
        family=family, encoder_options=encoder_options, tfds_data_dir=tfds_data_dir, cache_dir=cache_dir,
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
    row_multiple: int = 1, writer: bool = True, barrier: Callable[[], None] = lambda: None,
) -> Loaders:
    """Train and eval loaders from the trainer's config.

    Uses ``config.seed``, ``config.progress_bar``, ``config.data.{train, eval, eval_pairs, format,
    prompt_key, chosen_key, rejected_key, max_length, max_prompt_length, batch_size,
    micro_batch_size, packing, pack_rows, buckets, shuffle, on_bad_record, cache_dir}``,
    ``config.loss.name`` (``sft`` -> SFT examples; ``dove`` -> prompt + completion masks) and
    ``config.eval.batch_size``. The train loader yields micro-batches of
    ``micro_batch_size`` pairs (``batch_size`` when 0): a step consumes
    ``batch_size / micro_batch_size`` of them. Without ``data.eval`` the eval set is
    ``data.eval_pairs`` examples held out of ``data.train`` (seeded by ``config.seed``).
    Packed rows per batch are a multiple of ``row_multiple`` (the devices that split this
    process's rows). With the tokenized cache (``data.cache_dir``, ``cache_location``) only the
    ``writer`` (process 0) writes it, before ``barrier()``; the others open it after.
    """
    d = config.data
    family = "sft" if config.loss.name == "sft" else "preference"
    cache_dir = cache_location(d.get("cache_dir", ""))
    common = dict(
        max_length=d.max_length, max_prompt_length=d.max_prompt_length, format=d.format,
        keys=KeyMap(d.prompt_key, d.chosen_key, d.rejected_key), on_bad_record=d.on_bad_record, family=family,
        cache_dir=cache_dir, write_cache=writer, progress=writer and bool(config.get("progress_bar", False)),
    )

    def datasets() -> tuple[EncodedDataset, EncodedDataset | None]:
        return load_dataset(d.train, tokenizer, **common), (load_dataset(d.eval, tokenizer, **common) if d.eval else None)

    train_set, eval_set = writer_first(datasets, writer=writer, barrier=barrier) if cache_dir else datasets()
    report = train_set.report
    if eval_set is None and d.eval_pairs:
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
