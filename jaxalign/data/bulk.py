"""Encoding records to examples: one at a time, batched, or in bulk over the host's cores.

``encode_records`` tokenizes (``Encoder``) and truncates records, dropping and counting
examples that would keep no completion token; with ``batch_size`` it tokenizes through the
tokenizer's batch API, with the same results.

``encode_chunks`` cuts the records into chunks of ``chunk_size``; each chunk is tokenized with
the tokenizer's batch API (``Encoder.encode_many``: a fast tokenizer runs each batch on all
cores), truncated and flattened (``FlatExamples``), here or in a pool of ``workers`` processes
(``spawn``ed: the parent may hold JAX's threads, which ``fork`` does not survive; each worker
tokenizes on one thread; if the pool cannot start, the rest is encoded in this process). Chunks
come back in record order with their part of the report (bad records, drops, boundary merges), so
the result is the one-at-a-time ``encode_records`` result, bit for bit, whatever the number of
workers. A progress bar (tqdm, stderr) counts records when ``progress`` is set.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from jaxalign.data.encoding import EncodedExample, EncodedPair, Encoder
from jaxalign.data.flat import Example, FlatExamples, flatten
from jaxalign.data.records import BadRecord, DataReport, FieldError, OnBad, Record
from jaxalign.data.truncation import check_limits, truncate

__all__ = ["default_workers", "encode_chunks", "encode_records"]

log = logging.getLogger(__name__)
Chunk = tuple[FlatExamples, DataReport]
_worker: dict[str, Any] = {}  # a pool worker's encoder and options, set by ``_start_worker``


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _encoded(
    records: Sequence[Record], encoder: Encoder, batch_size: int
) -> Iterator[EncodedPair | EncodedExample | FieldError]:
    """Each record's example or ``FieldError``: one at a time, or ``batch_size`` records per
    call of the tokenizer's batch API (the same results)."""
    if batch_size <= 0:
        for record in records:
            try:
                yield encoder.encode(record)
            except FieldError as e:
                yield e
        return
    for start in range(0, len(records), batch_size):
        yield from encoder.encode_many(records[start:start + batch_size])


def encode_records(
    records: Sequence[Record],
    encoder: Encoder,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    on_bad_record: OnBad = "error",
    report: DataReport | None = None,
    batch_size: int = 0,
) -> tuple[list[Example], DataReport]:
    """Tokenized, truncated examples (pairs, or SFT examples) and the updated report;
    ``batch_size > 0`` tokenizes that many records per batch call (the same examples)."""
    check_limits(max_length, max_prompt_length, truncation_mode)
    report = report or DataReport()
    merges_before = encoder.boundary_merges
    out: list[Example] = []
    for record, example in zip(records, _encoded(records, encoder, batch_size)):
        if isinstance(example, FieldError):
            report.add_bad(BadRecord(record.file, record.line, example.field, example.problem), on_bad_record)
            continue
        kept = truncate(example, max_length=max_length, max_prompt_length=max_prompt_length, mode=truncation_mode)
        if kept is None:
            report.dropped["no completion token left"] += 1
            continue
        out.append(kept)
    report.boundary_merges += encoder.boundary_merges - merges_before
    return out, report


def _encode_chunk(encoder: Encoder, records: Sequence[Record], sequences: int, limits: dict[str, Any]) -> Chunk:
    examples, report = encode_records(records, encoder, report=DataReport(), batch_size=len(records), **limits)
    return flatten(examples, sequences), report


def _start_worker(tokenizer: Any, encoder_options: dict[str, Any], sequences: int, limits: dict[str, Any]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool spreads the work; one thread per worker
    _worker.update(encoder=Encoder(tokenizer, **encoder_options), sequences=sequences, limits=limits)


def _worker_chunk(records: Sequence[Record]) -> Chunk:
    return _encode_chunk(_worker["encoder"], records, _worker["sequences"], _worker["limits"])


def encode_chunks(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    sequences_per_example: int,
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: str,
    on_bad_record: OnBad,
    encoder_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_size: int = 512,
    progress: bool = False,
) -> Iterator[Chunk]:
    """``(examples, report part)`` of each chunk of ``records``, in order (module docstring).

    With ``workers`` unset or 1 (or one chunk) everything runs here, the tokenizer's own
    threads spreading each batch over the cores; ``workers > 1`` starts that many processes
    (each tokenizing on one thread), which pays their start-up (about 5 s on 2 busy cores) for
    parallel Python-side work. A bad record with ``on_bad_record="error"`` raises its
    ``DataError``.
    """
    from tqdm.auto import tqdm

    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
                  on_bad_record=on_bad_record)
    encoder_options = dict(encoder_options or {})
    chunks = [records[a:a + chunk_size] for a in range(0, len(records), chunk_size)]
    workers = min(workers or 1, len(chunks))
    bar = tqdm(total=len(records), unit="record", desc="tokenizing", dynamic_ncols=True, disable=not progress)
    done = 0
    try:
        if workers > 1:
            try:
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker,
                                         initargs=(tokenizer, encoder_options, sequences_per_example, limits)) as pool:
                    for result in pool.map(_worker_chunk, chunks):
                        bar.update(len(chunks[done]))
                        done += 1
                        yield result
            except BrokenProcessPool as e:  # e.g. a script without ``if __name__ == "__main__"``
                log.warning("tokenizer processes failed to start (%s); tokenizing in this process", e)
        encoder = Encoder(tokenizer, **encoder_options)
        for chunk in chunks[done:]:
            bar.update(len(chunk))
            yield _encode_chunk(encoder, chunk, sequences_per_example, limits)
    finally:
        bar.close()
