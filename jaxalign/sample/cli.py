"""Command line: ``python -m jaxalign.sample --model PATH --prompts FILE --output OUT.jsonl [...]``.

See the package docstring (``jaxalign.sample``) for what it does. ``main(argv)`` returns the
exit code: 0 done, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

DESCRIPTION = """Samples completions for every prompt of a file from a Hugging Face checkpoint
directory or a jaxalign run directory (its newest checkpoint, or its export), and writes one
JSON line per prompt, in input order: {"index", "prompt", "completions", "tokens",
"finish_reasons", "logps"}. Exit codes: 0 done, 2 bad input."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxalign.sample", description=DESCRIPTION)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="HF checkpoint directory (config.json + safetensors) or jaxalign run directory")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts: .jsonl / .jsonl.gz / .parquet (or a data source spec) with prompt-only, "
                        "preference or SFT records; message-list prompts go through the chat template")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="where to write the samples (atomically)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion at most (default 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 is off (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off (default 0)")
    p.add_argument("--seed", type=int, default=0, help="sample s of prompt i depends on (seed, i, s) only")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per compiled call (default 16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the run's model.dtype, else float32)")
    p.add_argument("--mesh-data", type=int, default=-1, help="mesh 'data' axis; -1 = the remaining devices")
    p.add_argument("--mesh-fsdp", type=int, default=1, help="mesh 'fsdp' axis (default 1)")
    p.add_argument("--mesh-tensor", type=int, default=1, help="mesh 'tensor' axis (default 1)")
    p.add_argument("--prompt-key", default="prompt", help="the prompt's key in the records (default 'prompt')")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory (default: the model's, or the run's model.tokenizer)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), unknown option or bad value (2)
        return int(e.code or 0)
    from jaxalign.sample.load import SampleError

    try:
        return _run(args)
    except SampleError as e:
        print(f"error: {' '.join(str(e).split(chr(10)))}", file=sys.stderr, flush=True)
        return 2


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from jaxalign.sample.load import SampleError
    from jaxalign.sampling import SamplingConfig

    if args.seed < 0:
        raise SampleError(f"--seed must be >= 0, got {args.seed}")
    try:
        return SamplingConfig(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              batch_size=args.batch_size, **extra)
    except ValueError as e:
        raise SampleError(str(e)) from None


def _records(args: argparse.Namespace) -> list[Any]:
    from jaxalign.data.dataset import read_records
    from jaxalign.data.formats import KeyMap
    from jaxalign.data.records import DataError
    from jaxalign.data.sources import SourceError
    from jaxalign.sample.load import SampleError

    try:
        records, _ = read_records(args.prompts, keys=KeyMap(prompt=args.prompt_key), on_bad_record="error")
    except (DataError, SourceError) as e:
        raise SampleError(str(e)) from None
    if not records:
        raise SampleError(f"{args.prompts}: no prompts")
    return records


def _mesh(args: argparse.Namespace) -> Any:
    import jax

    from jaxalign import parallel
    from jaxalign.sample.load import SampleError

    sizes = {"data": args.mesh_data, "fsdp": args.mesh_fsdp, "tensor": args.mesh_tensor}
    devices = None
    if -1 not in sizes.values() and math.prod(sizes.values()) < jax.device_count():
        devices = jax.devices()[: math.prod(sizes.values())]  # a smaller mesh uses the first devices
    try:
        return parallel.make_mesh(sizes, devices=devices)
    except ValueError as e:
        raise SampleError(f"mesh: {e}") from None


def _encode(records: list[Any], tokenizer: Any, max_new_tokens: int, max_position: int) -> tuple[list[Any], int]:
    """Prompt ids of every record (chat template, BOS) and the pad id; ``SampleError`` naming
    ``file:line`` for a prompt that cannot be encoded or does not fit the model's context."""
    import numpy as np

    from jaxalign.data.encoding import Encoder
    from jaxalign.data.records import FieldError, PromptRecord
    from jaxalign.sample.load import SampleError

    try:
        encoder = Encoder(tokenizer)
    except ValueError as e:
        raise SampleError(f"tokenizer: {e}") from None
    prompts = []
    for r in records:
        try:
            ids = encoder.encode_prompt(PromptRecord(r.prompt))
        except FieldError as e:
            raise SampleError(f"{r.file}:{r.line}: {e}") from None
        if len(ids) + max_new_tokens > max_position:
            raise SampleError(
                f"{r.file}:{r.line}: the prompt has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that "
                f"is {len(ids) + max_new_tokens}, more than the model's context of {max_position} positions")
        prompts.append(np.asarray(ids, np.int32))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else encoder.eos_id
    return prompts, int(pad)


def _output_lines(records: list[Any], samples: Any, tokenizer: Any) -> list[dict[str, Any]]:
    from jaxalign.sampling import FINISH_STOP

    lines = []
    for i, record in enumerate(records):
        texts, counts, reasons, logps = [], [], [], []
        for s in range(samples.tokens.shape[1]):
            keep = samples.mask[i, s] != 0
            ids = samples.tokens[i, s][keep].tolist()
            stopped = int(samples.finish[i, s]) == FINISH_STOP
            texts.append(tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False))
            counts.append(len(ids))
            reasons.append("stop" if stopped else "length")
            logps.append(float(samples.logps[i, s][keep].sum()))
        lines.append({"index": i, "prompt": record.prompt, "completions": texts, "tokens": counts,
                      "finish_reasons": reasons, "logps": logps})
    return lines


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from jaxalign.data.batching import bucket_ladder
    from jaxalign.data.jsonl import write_jsonl
    from jaxalign.sample.load import SampleError, load_policy
    from jaxalign.sampling import FINISH_STOP, sample
    from jaxalign.tokenizers import stop_ids

    _settings(args)  # bad numbers fail before anything is loaded
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise SampleError(f"--output {args.output}: directory {out_dir} does not exist")
    records = _records(args)
    mesh = _mesh(args)
    policy = load_policy(args.model, mesh=mesh, dtype=args.dtype, tokenizer=args.tokenizer)
    print(f"policy: {policy.source}", flush=True)
    prompts, pad_id = _encode(records, policy.tokenizer, args.max_new_tokens, policy.config.max_position)
    config = _settings(args, stop_ids=stop_ids(policy.tokenizer, policy.model_dir), pad_id=pad_id,
                       buckets=bucket_ladder(policy.config.max_position))

    bar = tqdm(total=len(prompts), unit="prompt", desc="sampling", file=sys.stderr, dynamic_ncols=True)
    start, generated = time.perf_counter(), 0

    def progress(prompts_done: int, tokens: int) -> None:
        nonlocal generated
        generated += tokens
        bar.set_postfix(tokens_per_s=f"{generated / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
        bar.update(prompts_done - bar.n)

    try:
        samples = sample(policy.graphdef, policy.params, prompts, config, mesh=mesh, progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    write_jsonl(args.output, _output_lines(records, samples, policy.tokenizer))
    total = int(samples.mask.sum())
    stopped = int((samples.finish == FINISH_STOP).sum())
    print(f"{len(prompts)} prompts x {config.num_samples} samples: {total} tokens in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9):.1f} tokens/s), {stopped} of {samples.finish.size} ended by a stop token; "
          f"wrote {args.output}", flush=True)
    return 0
