"""Preference data: records and formats, sources, tokenization and masks, truncation, batches, loader.

See ``jaxalign/data/README.md`` for the API and ``docs/architecture.md`` for the batch contract.
"""

from jaxalign.data.batching import (
    BATCH_KEYS,
    bucket_length,
    loss_mask,
    packed_batch,
    pad_batch,
    padded_batch,
    plan_pack,
    stack_micro_batches,
)
from jaxalign.data.dataset import DataReport, EncodedDataset, encode_records, load_dataset, read_records
from jaxalign.data.encoding import EncodedExample, EncodedPair, EncodedSequence, Encoder
from jaxalign.data.formats import FORMATS, KeyMap, detect_format, parse_row
from jaxalign.data.loader import Loader
from jaxalign.data.pipeline import Loaders, build_loader, build_loaders_from_config, mask_for_loss
from jaxalign.data.records import (
    BadRecord,
    DataError,
    FieldError,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
)
from jaxalign.data.sources import SourceError, iter_rows, resolve_source
from jaxalign.data.truncation import TRUNCATION_MODES, truncate_example, truncate_pair

__all__ = [
    "BATCH_KEYS",
    "FORMATS",
    "TRUNCATION_MODES",
    "BadRecord",
    "DataError",
    "DataReport",
    "EncodedDataset",
    "EncodedExample",
    "EncodedPair",
    "EncodedSequence",
    "Encoder",
    "FieldError",
    "KeyMap",
    "Loader",
    "Loaders",
    "PreferenceRecord",
    "PromptRecord",
    "SFTRecord",
    "SourceError",
    "bucket_length",
    "build_loader",
    "build_loaders_from_config",
    "detect_format",
    "encode_records",
    "iter_rows",
    "load_dataset",
    "loss_mask",
    "mask_for_loss",
    "packed_batch",
    "pad_batch",
    "padded_batch",
    "parse_row",
    "plan_pack",
    "read_records",
    "resolve_source",
    "stack_micro_batches",
    "truncate_example",
    "truncate_pair",
]
