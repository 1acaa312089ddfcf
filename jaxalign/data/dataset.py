"""From a source spec to validated records and to tokenized, truncated examples, with a report.

``read_records`` validates every row (``on_bad_record="error"`` raises ``DataError`` naming
file, line and field at the first bad row; ``"skip"`` skips it and records it in the
report). ``load_dataset`` also tokenizes (``Encoder``) and truncates, dropping and counting
examples that would keep no completion token.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

import numpy as np

from jaxalign.data.encoding import EncodedExample, EncodedPair, Encoder
from jaxalign.data.formats import HH_ASSISTANT_MARKER, KeyMap, parse_row
from jaxalign.data.records import (
    BadRecord,
    DataError,
    FieldError,
    PreferenceRecord,
    Record,
    SFTRecord,
)
from jaxalign.data.sources import iter_rows
from jaxalign.data.truncation import check_limits, truncate

__all__ = ["DataReport", "EncodedDataset", "encode_records", "load_dataset", "read_records"]

OnBad = Literal["error", "skip"]
Example = Union[EncodedPair, EncodedExample]


@dataclass
class DataReport:
    """What reading and encoding saw: rows, good records per format, bad rows, drops."""

    rows: int = 0
    formats: Counter = field(default_factory=Counter)
    bad: list[BadRecord] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    boundary_merges: int = 0

    @property
    def num_records(self) -> int:
        return sum(self.formats.values())

    def add_bad(self, bad: BadRecord, on_bad_record: OnBad) -> None:
        if on_bad_record == "error":
            raise DataError(bad)
        self.bad.append(bad)

    def summary(self, max_bad: int = 5) -> str:
        """A few lines for logs: counts per format, the first bad rows and totals."""
        lines = [f"rows read: {self.rows}"]
        lines += [f"records ({fmt}): {n}" for fmt, n in sorted(self.formats.items())]
        lines.append(f"bad records: {len(self.bad)}")
        lines += [f"  {b}" for b in self.bad[:max_bad]]
        if len(self.bad) > max_bad:
            lines.append(f"  ... and {len(self.bad) - max_bad} more")
        if self.dropped:
            lines += [f"dropped by truncation ({why}): {n}" for why, n in sorted(self.dropped.items())]
        if self.boundary_merges:
            lines.append(f"prompt/completion boundary merges tokenized apart: {self.boundary_merges}")
        return "\n".join(lines)


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


def encode_records(
    records: Iterable[Record],
    encoder: Encoder,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    on_bad_record: OnBad = "error",
    report: DataReport | None = None,
) -> tuple[list[Example], DataReport]:
    """Tokenized, truncated examples (pairs, or SFT examples) and the updated report."""
    check_limits(max_length, max_prompt_length, truncation_mode)
    report = report or DataReport()
    merges_before = encoder.boundary_merges
    out: list[Example] = []
    for record in records:
        try:
            example = encoder.encode(record)
        except FieldError as e:
            report.add_bad(BadRecord(record.file, record.line, e.field, e.problem), on_bad_record)
            continue
        kept = truncate(example, max_length=max_length, max_prompt_length=max_prompt_length, mode=truncation_mode)
        if kept is None:
            report.dropped["no completion token left"] += 1
            continue
        out.append(kept)
    report.boundary_merges += encoder.boundary_merges - merges_before
    return out, report


@dataclass
class EncodedDataset:
    """Tokenized examples in record order, with the report of how they were obtained."""

    examples: list[Example]
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)

    def split(self, holdout: int, seed: int) -> tuple[EncodedDataset, EncodedDataset]:
        """``(train, heldout)``: ``holdout`` examples chosen by a seeded permutation, both in record order."""
        if not 0 <= holdout < len(self.examples):
            raise ValueError(f"cannot hold out {holdout} of {len(self.examples)} examples")
        chosen = set(np.random.default_rng([seed, 0x401D]).permutation(len(self.examples))[:holdout].tolist())
        train = [e for i, e in enumerate(self.examples) if i not in chosen]
        held = [e for i, e in enumerate(self.examples) if i in chosen]
        return EncodedDataset(train, self.report), EncodedDataset(held, self.report)

    def fingerprint(self) -> str:
        """Hash of every example's index and token ids: changes when the data or encoding does."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(np.int64(e.index).tobytes())
            for s in e.sequences:
                h.update(np.int64(s.prompt_len).tobytes())
                h.update(s.ids.tobytes())
        return h.hexdigest()[:16]


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
) -> EncodedDataset:
    """Reads, validates, tokenizes and truncates ``spec`` for one training family.

    SFT on preference data trains on the chosen responses (prompt + chosen: the usual first
    step before DPO). SFT records in preference data are bad records.
    ``encoder_options`` go to ``Encoder`` (``add_bos``, ``eos_token``, ``on_boundary_merge``).
    """
    records, report = read_records(
        spec, format=format, keys=keys, marker=marker, on_bad_record=on_bad_record, tfds_data_dir=tfds_data_dir
    )
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
    encoder = Encoder(tokenizer, **(encoder_options or {}))
    examples, report = encode_records(
        usable, encoder, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode, on_bad_record=on_bad_record, report=report,
    )
    if not examples:
        raise ValueError(f"{spec}: no usable examples\n{report.summary()}")
    return EncodedDataset(examples, report)


def lengths_of(examples: Sequence[Example]) -> list[tuple[int, ...]]:
    """Sequence lengths of every example (the packer's input)."""
    return [tuple(len(s) for s in e.sequences) for e in examples]
