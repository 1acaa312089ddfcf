"""Validate a dataset before a long run.

    python -m jaxalign.data.check PATH [--format F] [--tokenizer DIR] [--max-length N]
                                       [--max-prompt-length N] [--truncation-mode M]

Prints the record count per detected format and the bad records (``file:line: field:
problem``, the first ``--show`` and a total); with ``--tokenizer``, the prompt / completion
token-length distribution and how many examples truncation would drop or cut. The options
and their defaults are the trainer's (``--max-length`` = ``data.max_length``, ``--prompt-key``
= ``data.prompt_key``, ...): pass a recipe's values to check what it will see. Exit status:
0 clean, 1 bad records found or no usable record (the trainer would refuse the data), 2
unusable arguments (missing path or tokenizer, bad limits).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from jaxalign.data.dataset import DataReport, read_records
from jaxalign.data.encoding import Encoder
from jaxalign.data.formats import FORMATS, KeyMap
from jaxalign.data.records import BadRecord, FieldError, PreferenceRecord, SFTRecord
from jaxalign.data.sources import SourceError, resolve_source
from jaxalign.data.truncation import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_PROMPT_LENGTH,
    TRUNCATION_MODES,
    check_limits,
    truncate,
)

EXIT_CLEAN, EXIT_BAD_RECORDS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxalign.data.check", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="data source: files, globs, directories (comma-separated) or tfds:NAME[:SPLIT]")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="record format (default: detect per row)")
    p.add_argument("--tokenizer", help="tokenizer directory: also report token lengths and truncation")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help=f"max tokens of prompt + completion (data.max_length; default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--max-prompt-length", type=int, default=DEFAULT_MAX_PROMPT_LENGTH,
                   help=f"max prompt tokens (data.max_prompt_length; default {DEFAULT_MAX_PROMPT_LENGTH})")
    p.add_argument("--truncation-mode", default="keep_start", choices=TRUNCATION_MODES)
    p.add_argument("--prompt-key", default="prompt", help="prompt column (data.prompt_key)")
    p.add_argument("--chosen-key", default="chosen", help="chosen-response column (data.chosen_key)")
    p.add_argument("--rejected-key", default="rejected", help="rejected-response column (data.rejected_key)")
    p.add_argument("--show", type=int, default=10, help="bad records to list (default 10)")
    return p


def _distribution(name: str, values: list[int]) -> str:
    if not values:
        return f"  {name:<22} (none)"
    v = np.asarray(values)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return (f"  {name:<22} n={v.size} min={v.min()} mean={v.mean():.1f} p50={p50:.0f} "
            f"p90={p90:.0f} p99={p99:.0f} max={v.max()}")


def _token_report(records, tokenizer, args, report: DataReport, out) -> None:
    encoder = Encoder(tokenizer)
    lengths: dict[str, list[int]] = {"prompt": [], "completion (chosen)": [], "completion (rejected)": [], "sequence": []}
    dropped = cut = kept = 0
    for record in records:
        if not isinstance(record, (PreferenceRecord, SFTRecord)):
            continue  # prompt-only records are checked for sampling, not for training lengths
        try:
            example = encoder.encode(record)
        except FieldError as e:
            report.bad.append(BadRecord(record.file, record.line, e.field, e.problem))
            continue
        seqs = example.sequences
        shared_prompt = isinstance(record, PreferenceRecord) and not record.is_joint
        lengths["prompt"] += [s.prompt_len for s in (seqs[:1] if shared_prompt else seqs)]
        lengths["completion (chosen)"].append(seqs[0].completion_len)
        if len(seqs) > 1:
            lengths["completion (rejected)"].append(seqs[1].completion_len)
        lengths["sequence"] += [len(s) for s in seqs]
        after = truncate(example, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                         mode=args.truncation_mode)
        if after is None:
            dropped += 1
        elif after is not example:
            cut += 1
            kept += 1
        else:
            kept += 1
    print("token lengths (BOS and EOS included):", file=out)
    for name, values in lengths.items():
        print(_distribution(name, values), file=out)
    print(f"truncation (max_length={args.max_length}, max_prompt_length={args.max_prompt_length}, "
          f"mode={args.truncation_mode}): {dropped} of {dropped + kept} examples would be dropped "
          f"(no completion token left), {cut} cut", file=out)
    if encoder.boundary_merges:
        print(f"prompt/completion boundary merges (completion tokenized apart): {encoder.boundary_merges}", file=out)


def main(argv: Sequence[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return EXIT_USAGE if e.code else EXIT_CLEAN
    try:
        resolve_source(args.path)
        check_limits(args.max_length, args.max_prompt_length, args.truncation_mode)
    except (SourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    tokenizer = None
    if args.tokenizer:
        from jaxalign.tokenizers import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            print(f"error: --tokenizer: {e}", file=sys.stderr)
            return EXIT_USAGE
    keys = KeyMap(args.prompt_key, args.chosen_key, args.rejected_key)
    try:
        records, report = read_records(args.path, format=args.format, keys=keys, on_bad_record="skip")
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"checked: {args.path}", file=out)
    print(f"rows read: {report.rows}", file=out)
    print("records per format:", file=out)
    for fmt in FORMATS:
        if report.formats[fmt]:
            print(f"  {fmt}: {report.formats[fmt]}", file=out)
    if tokenizer is not None:
        _token_report(records, tokenizer, args, report, out)
    print(f"bad records: {len(report.bad)}", file=out)
    for bad in report.bad[: args.show]:
        print(f"  {bad}", file=out)
    if len(report.bad) > args.show:
        print(f"  ... and {len(report.bad) - args.show} more", file=out)
    if not records:
        print("error: no usable record: the trainer would refuse this data", file=sys.stderr)
        return EXIT_BAD_RECORDS
    return EXIT_BAD_RECORDS if report.bad else EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())
