"""Benchmark of the tokenized-data cache (``tools/bench_data.py``; docs/performance.md).

Measured side by side in one run, with the Qwen2.5 tokenizer built locally
(``jaxalign.tokenizers.build_qwen_tokenizer``, no download):

(a) tokenization of an HH-RLHF-style set (the committed fixture's rows, each copy perturbed
    so that no two prompts are equal): today's path (``encode_records`` one record at a time)
    against the batched, multi-process build of the cache (reading, tokenizing, writing);
(b) start to first batch of a resumed run: today's path (read, tokenize, hold-out split,
    loader, ``set_state``, first batch) against the trainer's loaders opened from the cache;
(c) host memory (RSS growth, ``/proc/self/status``, in a fresh process) of a loader over a
    synthetic 1M-pair set memory-mapped from a store, against the bytes of its token array,
    after an epoch plan and the data fingerprint (which reads every token); and, for scale, the
    same examples held as today's Python objects.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np

from jaxalign.data.bulk import default_workers, encode_records
from jaxalign.data.dataset import EncodedDataset, load_dataset, read_records
from jaxalign.data.encoding import Encoder
from jaxalign.data.flat import FlatExamples
from jaxalign.data.loader import Loader
from jaxalign.data.pipeline import build_loaders_from_config, loader_for
from jaxalign.data.store import read_store, write_store

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hh-rlhf" / "harmless-base-test-200.jsonl.gz"
LIMITS = dict(max_length=512, max_prompt_length=256)


def write_hh_style(path: str, pairs: int) -> None:
    """``pairs`` rows: the fixture's rows in turn, copy ``k`` with ``[k]`` in its first human turn."""
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(pairs):
            row, k = rows[i % len(rows)], i // len(rows)
            out.write(json.dumps({key: text.replace("Human: ", f"Human: [{k}] ", 1) for key, text in row.items()}) + "\n")


def _config(path: str, cache_dir: str) -> ml_collections.ConfigDict:
    from jaxalign.train.config import base_config

    config = base_config()
    config.data.update(train=path, cache_dir=cache_dir, on_bad_record="skip", **LIMITS)
    config.progress_bar = False
    return config


def _today_first_batch(path: str, tokenizer, config, state: dict) -> tuple[float, float, int]:
    """``(seconds to the first batch, seconds tokenizing, pairs)`` along today's path."""
    start = time.perf_counter()
    records, report = read_records(path, on_bad_record="skip")
    t0 = time.perf_counter()
    examples, report = encode_records(records, Encoder(tokenizer), on_bad_record="skip", report=report, **LIMITS)
    encode = time.perf_counter() - t0
    train, _ = EncodedDataset(examples, report).split(config.data.eval_pairs, config.seed)
    loader = loader_for(train, tokenizer, batch_size=config.data.batch_size, train=True, seed=config.seed,
                        buckets=tuple(config.data.buckets))
    loader.set_state(state)
    next(loader)
    return time.perf_counter() - start, encode, len(records)


def _cached_first_batch(tokenizer, config, state: dict) -> float:
    """Seconds to the first batch of a resume through the trainer's loaders (from the cache)."""
    start = time.perf_counter()
    loader = build_loaders_from_config(config, tokenizer, shard_index=0, shard_count=1).train
    loader.set_state(state)
    next(loader)
    return time.perf_counter() - start


def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def write_synthetic_store(directory: str, pairs: int, seed: int = 0) -> int:
    """A store of ``pairs`` random pairs (prompts 8-120 tokens, completions 4-60), in chunks;
    returns its token bytes."""
    rng = np.random.default_rng(seed)
    chunk = 100_000

    def chunks():
        for a in range(0, pairs, chunk):
            n = min(chunk, pairs - a)
            prompt = rng.integers(8, 121, n)
            lens = np.stack([prompt + rng.integers(4, 61, n), prompt + rng.integers(4, 61, n)], 1).reshape(-1)
            yield FlatExamples(tokens=rng.integers(3, 150_000, int(lens.sum()), dtype=np.int32),
                               starts=np.concatenate([[0], np.cumsum(lens)]), prompt_lens=np.repeat(prompt, 2),
                               has_bos=np.zeros(2 * n, bool), record_index=np.arange(a, a + n),
                               sequences_per_example=2)

    write_store(directory, chunks(), 2, lambda: {"report": {}})
    return os.path.getsize(os.path.join(directory, "tokens.bin"))


def memory_probe(directory: str, mode: str) -> dict[str, float]:
    """RSS growth of a loader over the store at ``directory`` (``mode``: ``cache`` = memory-mapped,
    ``objects`` = today's list of ``EncodedPair``), after the epoch plan, a few batches and the
    fingerprint."""
    base = _rss()
    examples, _ = read_store(directory)
    if mode == "objects":
        examples = list(examples)
    dataset = EncodedDataset(examples, None)
    train, _ = dataset.split(64, 0)
    loader = Loader(train, batch_size=64, pad_id=0, seed=0, buckets=(256,), shard_index=0, shard_count=1)
    for _ in range(20):
        next(loader)
    loader.set_state(loader.get_state())
    now = _rss()
    return {"rss_growth": now["VmRSS"] - base["VmRSS"], "peak_growth": now["VmHWM"] - base["VmRSS"]}


def _probe(directory: str, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "jaxalign.bench.data_cache", "--probe", directory, mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(pairs: int, memory_pairs: int, workers: int, work: str) -> dict:
    from jaxalign.tokenizers import build_qwen_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(build_qwen_tokenizer(os.path.join(work, "qwen")))
    path = os.path.join(work, "hh-style.jsonl")
    write_hh_style(path, pairs)
    cache_dir = os.path.join(work, "cache")
    start = time.perf_counter()  # the cache's first build: what a first run pays
    load_dataset(path, tokenizer, on_bad_record="skip", cache_dir=cache_dir, workers=workers, **LIMITS)
    build_seconds = time.perf_counter() - start
    config = _config(path, cache_dir)
    loader = build_loaders_from_config(config, tokenizer, shard_index=0, shard_count=1).train
    for _ in range(5):  # a few steps on: the position a resume restores
        next(loader)
    cached_seconds = _cached_first_batch(tokenizer, config, loader.get_state())
    today_seconds, today_encode, records = _today_first_batch(path, tokenizer, config, loader.get_state())
    store_dir = os.path.join(work, "synthetic-store")
    token_bytes = write_synthetic_store(store_dir, memory_pairs)
    cache_mem, objects_mem = _probe(store_dir, "cache"), _probe(store_dir, "objects")
    return {
        "pairs": records, "workers": workers,
        "today_pairs_per_s": records / today_encode,
        "cache_build_pairs_per_s": records / build_seconds,
        "cores": default_workers(), "cache_build_pairs_per_s_per_core": records / build_seconds / default_workers(),
        "tokenize_speedup": today_encode / build_seconds,
        "today_first_batch_s": today_seconds, "cached_first_batch_s": cached_seconds,
        "resume_speedup": today_seconds / cached_seconds,
        "memory_pairs": memory_pairs, "token_bytes": token_bytes,
        "cache_rss_growth": cache_mem["rss_growth"], "cache_rss_ratio": cache_mem["rss_growth"] / token_bytes,
        "objects_rss_growth": objects_mem["rss_growth"], "objects_rss_ratio": objects_mem["rss_growth"] / token_bytes,
    }


def markdown(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    return "\n".join([
        "| measure | today | with the cache | ratio (goal) |",
        "|---|---|---|---|",
        f"| tokenization, {r['pairs']:,} pairs (pairs/s) | {r['today_pairs_per_s']:,.0f} | "
        f"{r['cache_build_pairs_per_s']:,.0f} ({r['cache_build_pairs_per_s_per_core']:,.0f} per core, "
        f"{r['cores']} cores, {r['workers']} process(es)) | **{r['tokenize_speedup']:.1f}x** (>= 5x) |",
        f"| resume: start to first batch | {r['today_first_batch_s']:.1f} s | {r['cached_first_batch_s']:.2f} s | "
        f"**{r['resume_speedup']:.0f}x** (>= 20x) |",
        f"| loader host memory, {r['memory_pairs']:,} pairs ({mib(r['token_bytes'])} of tokens) | "
        f"{mib(r['objects_rss_growth'])} ({r['objects_rss_ratio']:.2f}x) | {mib(r['cache_rss_growth'])} | "
        f"**{r['cache_rss_ratio']:.2f}x** token bytes (<= 1.5x) |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100_000, help="pairs of the HH-style set (a, b)")
    p.add_argument("--memory-pairs", type=int, default=1_000_000, help="pairs of the synthetic store (c)")
    p.add_argument("--workers", type=int, default=1,
                   help=f"tokenizer processes of the cache build (1: in this process, the tokenizer's threads on "
                        f"all {default_workers()} cores)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--probe", nargs=2, metavar=("STORE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(*args.probe)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        result = run(args.pairs, args.memory_pairs, args.workers, work)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
