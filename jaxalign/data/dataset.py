"""From a source spec to validated records and to tokenized, truncated examples, with a report.

``read_records`` validates every row (``on_bad_record="error"`` raises ``DataError`` naming
file, line and field at the first bad row; ``"skip"`` skips it and records it in the
report). ``load_dataset`` also tokenizes (``Encoder``, batched over the host's cores:
``jaxalign.data.bulk``) and truncates, dropping and counting examples that would keep no
completion token, optionally through the tokenized cache (``jaxalign.data.cache``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from jaxalign.data.bulk import encode_chunks, encode_records
from jaxalign.data.cache import cached, source_digests, tokenizer_digest
from jaxalign.data.flat import Example, FlatExamples, join
from jaxalign.data.formats import HH_ASSISTANT_MARKER, KeyMap, parse_row
from jaxalign.data.records import BadRecord, DataReport, FieldError, OnBad, PreferenceRecord, Record, SFTRecord
from jaxalign.data.sources import iter_rows, resolve_source
from jaxalign.data.truncation import check_limits

__all__ = ["DataReport", "EncodedDataset", "encode_records", "load_dataset", "read_records"]


def read_records(
    spec: str,
    *,
    format: str = "auto",
    keys: KeyMap = KeyMap(),
    marker: str = HH_ASSISTANT_MARKER,
    on_bad_record: OnBad = "error",
    tfds_data_dir: str | None = None,
    report: DataReport | None = None,
) -> tuple[list[Record], DataReport]:
    """All good records of ``spec`` in order (``index`` 0, 1, ...) and the report."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    report = report or DataReport()
    records: list[Record] = []
    for file, line, row in iter_rows(spec, tfds_data_dir=tfds_data_dir):
        report.rows += 1
        try:
            if isinstance(row, FieldError):
                raise row
            record = parse_row(row, format=format, keys=keys, marker=marker)
        except FieldError as e:
            report.add_bad(BadRecord(file, line, e.field, e.problem), on_bad_record)
            continue
        records.append(replace(record, index=len(records), file=file, line=line))
        report.formats[record.format] += 1
    return records, report


def _take(examples: Sequence[Example], positions: np.ndarray) -> Sequence[Example]:
    if isinstance(examples, FlatExamples):
        return examples.take(positions)
    return [examples[i] for i in positions.tolist()]


@dataclass
class EncodedDataset:
    """Tokenized examples in record order, with the report of how they were obtained.

    ``examples`` is a list, or ``FlatExamples`` (flat arrays, in memory or memory-mapped from
    the cache, read lazily): ``lengths``, ``split`` and ``fingerprint`` then work on the arrays
    and give what they give for the list of the same examples.
    """

    examples: Sequence[Example]
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        """int64 ``[len, sequences per example]``: the sequence lengths (the loader's plan input)."""
        if isinstance(self.examples, FlatExamples):
            return self.examples.lengths()
        return np.asarray([[len(s) for s in e.sequences] for e in self.examples], np.int64)

    def split(self, holdout: int, seed: int) -> tuple[EncodedDataset, EncodedDataset]:
        """``(train, heldout)``: ``holdout`` examples chosen by a seeded permutation, both in record order."""
        n = len(self.examples)
        if not 0 <= holdout < n:
            raise ValueError(f"cannot hold out {holdout} of {n} examples")
        chosen = np.zeros(n, bool)
        chosen[np.random.default_rng([seed, 0x401D]).permutation(n)[:holdout]] = True
        return (EncodedDataset(_take(self.examples, np.flatnonzero(~chosen)), self.report),
                EncodedDataset(_take(self.examples, np.flatnonzero(chosen)), self.report))

    def fingerprint(self) -> str:
        """Hash of every example's index and token ids: changes when the data or encoding does."""
        if isinstance(self.examples, FlatExamples):
            return self.examples.fingerprint()
        h = hashlib.sha256()
        for e in self.examples:
            h.update(np.int64(e.index).tobytes())
            for s in e.sequences:
                h.update(np.int64(s.prompt_len).tobytes())
                h.update(s.ids.tobytes())
        return h.hexdigest()[:16]


def _usable_records(
    spec: str, *, family: str, format: str, keys: KeyMap, marker: str, on_bad_record: OnBad,
    tfds_data_dir: str | None, report: DataReport,
) -> list[Record]:
    """The records of ``spec`` that ``family`` trains on (preference records become SFT ones
    for SFT); the others are bad records."""
    records, report = read_records(spec, format=format, keys=keys, marker=marker, on_bad_record=on_bad_record,
                                   tfds_data_dir=tfds_data_dir, report=report)
    want = PreferenceRecord if family == "preference" else SFTRecord
    usable = []
    for r in records:
        if family == "sft" and isinstance(r, PreferenceRecord):
            r = SFTRecord(r.prompt, r.chosen, format=r.format, index=r.index, file=r.file, line=r.line)
        if isinstance(r, want):
            usable.append(r)
        else:
            problem = f"a {r.format!r} record cannot be used for {family} training"
            report.add_bad(BadRecord(r.file, r.line, "<row>", problem), on_bad_record)
    return usable


def load_dataset(
    spec: str,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    format: str = "auto",
    keys: KeyMap = KeyMap(),
    marker: str = HH_ASSISTANT_MARKER,
    on_bad_record: OnBad = "error",
    family: Literal["preference", "sft"] = "preference",
    encoder_options: dict[str, Any] | None = None,
    tfds_data_dir: str | None = None,
    cache_dir: str | None = None,
    write_cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> EncodedDataset:
    """Reads, validates, tokenizes and truncates ``spec`` for one training family.

    SFT on preference data trains on the chosen responses (prompt + chosen: the usual first
    step before DPO). SFT records in preference data are bad records.
    ``encoder_options`` go to ``Encoder`` (``add_bos``, ``eos_token``, ``on_boundary_merge``).
    Tokenization is batched (the tokenizer's threads use the cores) and, with ``workers > 1``,
    spread over that many processes (``jaxalign.data.bulk``; ``progress``: a progress bar). With ``cache_dir`` the examples come from (or, when
    ``write_cache``, go first to) the tokenized cache there (``jaxalign.data.cache``; TFDS
    sources are not cached); the examples are then ``FlatExamples`` memory-mapped from it.
    """
    check_limits(max_length, max_prompt_length, truncation_mode)
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if family not in ("preference", "sft"):
        raise ValueError(f"family must be 'preference' or 'sft', got {family!r}")
    sequences = 2 if family == "preference" else 1

    def build(report: DataReport) -> Iterator[FlatExamples]:
        usable = _usable_records(spec, family=family, format=format, keys=keys, marker=marker,
                                 on_bad_record=on_bad_record, tfds_data_dir=tfds_data_dir, report=report)
        for examples, part in encode_chunks(
            usable, tokenizer, sequences_per_example=sequences, max_length=max_length,
            max_prompt_length=max_prompt_length, truncation_mode=truncation_mode, on_bad_record=on_bad_record,
            encoder_options=encoder_options, workers=workers, progress=progress,
        ):
            report.merge(part)
            yield examples

    digests = source_digests(spec) if cache_dir else None
    if digests is None:
        report = DataReport()
        examples = join(list(build(report)), sequences)
    else:
        parts = dict(
            sources=digests, tokenizer=tokenizer_digest(tokenizer), chat_template=getattr(tokenizer, "chat_template", None),
            family=family, format=format, keys=asdict(keys), marker=marker, on_bad_record=on_bad_record,
            encoder_options=encoder_options or {}, max_length=max_length, max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
        )
        examples, report = cached(cache_dir, parts, resolve_source(spec), build, sequences, write=write_cache)
    if not len(examples):
        raise ValueError(f"{spec}: no usable examples\n{report.summary()}")
    return EncodedDataset(examples, report)
