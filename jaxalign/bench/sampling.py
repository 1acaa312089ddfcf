"""The sampling benchmark: jaxalign's sampler against transformers' ``generate``, side by side.

    python tools/bench_sample.py --hidden 512 --layers 8 --vocab 32000 --rows 16,64 \
        --prompt-length 128 --new-tokens 128 --rounds 3 --dtype float32 --json out.json

Same weights (the workload checkpoint of ``jaxalign.bench.workload``), same prompts (seeded
random ids of exactly ``--prompt-length``, no special tokens), same settings, exactly
``--new-tokens`` new tokens per row on both sides. Cases: every ``--rows`` x ``--samples``
(prompts = rows / samples; our sampler prefills a prompt once for its samples) x
``--modes`` (greedy, sample = temperature 1, no top-k/top-p). Per case, one worker per side
(``jaxalign.bench.sampling_sides``) is set up (alone on the machine), then ``--rounds``
rounds of one timed call per side, alternating (A B, B A, ...). ``tokens/s = rows * new_tokens
/ seconds``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.bench.sampling_sides import Case, kv_cache_bytes, serve_jaxalign, serve_transformers
from jaxalign.bench.session import Worker
from jaxalign.bench.workload import ModelSpec, build_workload

__all__ = ["main", "markdown", "parse_args", "run", "summarize_case"]

MODES = {"greedy": 0.0, "sample": 1.0}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench_sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = heads")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", default="16,64", help="comma-separated rows (prompts x samples) per call")
    p.add_argument("--samples", default="1,4", help="comma-separated samples per prompt (each must divide rows)")
    p.add_argument("--modes", default="greedy,sample", help="greedy and/or sample (temperature 1)")
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads (XLA uses every core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench_sample")
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--markdown", nargs="?", const="-", default=None,
                   help="print the tables as markdown (to this file when a path is given)")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    args.rows_list, args.samples_list = _ints(args.rows), _ints(args.samples)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.rows_list or min(args.rows_list) < 1 or not args.samples_list or min(args.samples_list) < 1:
        p.error("--rows and --samples must be positive integers")
    bad = [f"{r}/{s}" for r in args.rows_list for s in args.samples_list if r % s]
    if bad:
        p.error(f"--samples must divide every --rows (not: {', '.join(bad)})")
    if not args.mode_list or any(m not in MODES for m in args.mode_list):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    for name in ("prompt_length", "new_tokens", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    from jaxalign.bench.main import _machine as machine

    return machine()


def _prompts(model_dir: str, tokenizer_size: int, count: int, length: int, seed: int) -> np.ndarray:
    """Seeded random ids of the tokenizer's range above its special tokens."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    specials = [config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    low = max([s for s in specials if isinstance(s, int)] + [-1]) + 1
    return np.random.default_rng(seed).integers(low, tokenizer_size, size=(count, length), dtype=np.int32)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_case(case: Case, raw: dict[str, dict[str, Any]], *, floor_kv: int, prompt_length: int) -> dict[str, Any]:
    """Per side: tokens/s (median, range), compile, prefill and per-step estimates, memory;
    the ratio jaxalign / transformers of median tokens/s and of each round's pair."""
    sides: dict[str, Any] = {}
    for side, r in raw.items():
        setup, windows = r["setup"], r["windows"]
        seconds = [w["seconds"] for w in windows]
        rates = [w["tokens"] / w["seconds"] for w in windows]
        call_s = statistics.median(seconds)
        one = setup["one_token_call_s"]
        # ours: a one-token call = prefill + 1 forward, a full call = prefill + T forwards;
        # transformers: prefill only, and prefill + (T - 1) forwards.
        step = (call_s - one) / (case.new_tokens - 1) if case.new_tokens > 1 else float("nan")
        prefill = one - step if side == "jaxalign" else one
        floor = setup["weight_bytes"] + floor_kv
        call_peaks = [w["call_peak_rss_bytes"] for w in windows if w.get("call_peak_rss_bytes")]
        increases = [w["call_peak_rss_bytes"] - w["rss_before_bytes"] for w in windows if w.get("call_peak_rss_bytes")]
        sides[side] = {
            "tokens_per_s": _spread(rates), "seconds_per_call": _spread(seconds),
            "cores_used": _spread([w["cpu_s"] / w["seconds"] for w in windows]) if "cpu_s" in windows[0] else None,
            "tokens_per_call": [w["tokens"] for w in windows], "rows": [w["rows"] for w in windows],
            "one_token_call_s": one, "prefill_s_estimate": prefill, "decode_step_ms_estimate": 1000 * step,
            "first_call_s": setup["first_call_s"], "load_s": setup["load_s"],
            "compile_s": setup.get("compile_s"), "compile_one_token_s": setup.get("compile_one_token_s"),
            "compile_s_in_timed_calls": [w.get("compile_s_in_call") for w in windows],
            "compiled_programs": [w.get("compiled_programs") for w in windows] if side == "jaxalign" else None,
            "weight_bytes": setup["weight_bytes"], "kv_cache_bytes": floor_kv, "floor_bytes": floor,
            "process_peak_rss_bytes": r["finish"]["peak_rss_bytes"],
            "call_peak_rss_bytes": max(call_peaks) if call_peaks else None,
            "call_rss_increase_bytes": max(increases) if increases else None,
            "call_peak_over_floor": max(call_peaks) / floor if call_peaks else None,
            "call_increase_over_kv": max(increases) / floor_kv if increases else None,
            # what the call adds to the resident weights, against the floor (the runtime left out)
            "weights_plus_increase_over_floor": (setup["weight_bytes"] + max(increases)) / floor if increases else None,
            "setup": {k: v for k, v in setup.items() if k != "warmup_tokens"},
        }
    out: dict[str, Any] = {"case": {**asdict(case), "prompts": case.prompts, "mode": case.mode, "label": case.label,
                                    "prompt_length": prompt_length}, "sides": sides}
    if {"jaxalign", "transformers"} <= set(sides):
        ours, theirs = raw["jaxalign"]["windows"], raw["transformers"]["windows"]
        per_round = [(a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"]) for a, b in zip(ours, theirs)]
        out["ratio_tokens_per_s"] = (sides["jaxalign"]["tokens_per_s"]["median"]
                                     / sides["transformers"]["tokens_per_s"]["median"])
        out["ratio_per_round"] = per_round
        out["tokens_equal"] = [a["tokens"] for a in ours] == [b["tokens"] for b in theirs]
        a, b = raw["jaxalign"]["setup"].get("warmup_tokens"), raw["transformers"]["setup"].get("warmup_tokens")
        if a is not None and b is not None:  # greedy: how often the two argmaxes agree, position by position
            a, b = np.asarray(a), np.asarray(b)
            out["greedy_token_agreement"] = float((a == b).mean())
            out["greedy_rows_identical"] = float((a == b).all(axis=1).mean())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from jaxalign.bench.trl_side import trl_unavailable_reason

    workdir = Path(args.workdir).resolve()
    spec = ModelSpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                     vocab=args.vocab)
    max_length = max(512, args.prompt_length + args.new_tokens)  # the model's positions; >= 512 keeps HH pairs
    _log(f"[bench_sample] building the workload in {workdir}")
    workload = build_workload(workdir / "workload", spec, max_length=max_length, seed=args.seed)
    prompts = _prompts(workload.model_dir, workload.tokenizer_size, max(args.rows_list), args.prompt_length, args.seed)
    skipped = trl_unavailable_reason()
    head_dim, kv_heads = args.hidden // args.heads, args.kv_heads or args.heads
    dtype_bytes = 4 if args.dtype == "float32" else 2
    load_before = os.getloadavg()
    cases, loads = [], []
    for rows in args.rows_list:
        for samples in args.samples_list:
            for mode in args.mode_list:
                case = Case(rows=rows, samples=samples, temperature=MODES[mode], new_tokens=args.new_tokens,
                            dtype=args.dtype, seed=args.seed)
                kwargs = dict(model_dir=workload.model_dir, prompts=prompts, case=asdict(case), threads=args.threads)
                workers = [Worker(f"jaxalign/{case.label}", serve_jaxalign, kwargs, timeout_s=args.timeout)]
                if not skipped:
                    env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
                    workers.append(Worker(f"transformers/{case.label}", serve_transformers, kwargs, env=env,
                                          timeout_s=args.timeout))
                raw: dict[str, dict[str, Any]] = {}
                try:
                    for w in workers:
                        start = time.perf_counter()
                        w.start()
                        side = w.name.split("/")[0]
                        raw[side] = {"setup": w.request("setup"), "windows": []}
                        _log(f"[bench_sample] {w.name}: ready in {time.perf_counter() - start:.1f} s "
                             f"(first call {raw[side]['setup']['first_call_s']:.2f} s)")
                    for r in range(args.rounds):
                        for w in (workers if r % 2 == 0 else workers[::-1]):  # A B, B A, ...: order effects cancel
                            side = w.name.split("/")[0]
                            window = w.request("window", 1)
                            window["loadavg_1m"] = os.getloadavg()[0]
                            loads.append(window["loadavg_1m"])
                            raw[side]["windows"].append(window)
                            _log(f"[bench_sample] round {r + 1}/{args.rounds} {w.name}: "
                                 f"{window['tokens'] / window['seconds']:.0f} tokens/s ({window['seconds']:.2f} s, "
                                 f"load {window['loadavg_1m']:.2f})")
                    for w in workers:
                        raw[w.name.split("/")[0]]["finish"] = w.request("finish")
                finally:
                    for w in workers:
                        w.stop()
                kv = kv_cache_bytes(layers=args.layers, rows=rows, slots=args.prompt_length + args.new_tokens,
                                    kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes)
                cases.append(summarize_case(case, raw, floor_kv=kv, prompt_length=args.prompt_length))
    return {
        "cases": cases, "transformers_skipped": skipped, "workload": workload.to_dict(),
        "settings": {k: getattr(args, k) for k in ("rows", "samples", "modes", "prompt_length", "new_tokens",
                                                   "rounds", "dtype", "threads", "seed")},
        "load": {"before": list(load_before), "after": list(os.getloadavg()),
                 "windows_mean": sum(loads) / len(loads) if loads else None, "windows_max": max(loads, default=None)},
        "machine": _machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "tools/bench_sample.py", *(sys.argv[1:] if sys.argv[0].endswith(
            "bench_sample.py") else [])]),
    }


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["workload"]["spec"]
    st = result["settings"]
    first = result["cases"][0]["sides"] if result["cases"] else {}
    versions = {k: v for side in first.values() for k, v in side["setup"].items() if k.endswith("_version")}
    lines = [
        f"model: hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, "
        f"kv heads {s['kv_heads'] or s['heads']}, "
        f"vocab {s['vocab']}, {st['dtype']}; prompt {st['prompt_length']} tokens, {st['new_tokens']} new tokens; "
        f"{st['rounds']} rounds; torch threads {st['threads']}, XLA default; "
        + ", ".join(f"{k.removesuffix('_version')} {v}" for k, v in versions.items())
        + f"; CPU {result['machine']['cpu']} ({result['machine']['cores']} cores); load during calls "
        f"{result['load']['windows_mean'] or 0:.2f} (max {result['load']['windows_max'] or 0:.2f})",
        "",
        "| rows (prompts x samples) | mode | side | tokens/s median (min-max) | s/call | cores used | prefill s "
        "| ms/step | compile s | call peak RSS MiB | call RSS increase MiB | floor MiB (weights + KV) | peak / floor "
        "| (weights + increase) / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        k = c["case"]
        for side, v in c["sides"].items():
            t = v["tokens_per_s"]
            comp = v.get("compile_s")
            peak, inc = v["call_peak_rss_bytes"], v["call_rss_increase_bytes"]
            over = "-" if peak is None else f"{peak / v['floor_bytes']:.2f}"
            cores = "-" if not v.get("cores_used") else f"{v['cores_used']['median']:.2f}"
            over_inc = "-" if inc is None else f"{(v['weight_bytes'] + inc) / v['floor_bytes']:.2f}"
            lines.append(
                f"| {k['rows']} ({k['prompts']} x {k['samples']}) | {k['mode']} | {side} | {t['median']:.0f} "
                f"({t['min']:.0f}-{t['max']:.0f}) | {v['seconds_per_call']['median']:.2f} | {cores} | "
                f"{v['prefill_s_estimate']:.3f} | {v['decode_step_ms_estimate']:.1f} | "
                f"{'-' if comp is None else f'{comp:.1f}'} | {_mib(peak)} | {_mib(inc)} | "
                f"{_mib(v['floor_bytes'])} | {over} | {over_inc} |")
    ratios = [c for c in result["cases"] if "ratio_tokens_per_s" in c]
    if ratios:
        lines += ["", "| rows (prompts x samples) | mode | jaxalign / transformers tokens/s (per-round range) "
                      "| tokens equal | greedy agreement |", "|---|---|---|---|---|"]
        for c in ratios:
            k, pr = c["case"], c["ratio_per_round"]
            agree = c.get("greedy_token_agreement")
            lines.append(f"| {k['rows']} ({k['prompts']} x {k['samples']}) | {k['mode']} | "
                         f"**{c['ratio_tokens_per_s']:.2f}x** ({min(pr):.2f}-{max(pr):.2f}) | {c['tokens_equal']} | "
                         f"{'-' if agree is None else f'{100 * agree:.1f}% of tokens'} |")
    if result.get("transformers_skipped"):
        lines += ["", result["transformers_skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.markdown and args.markdown != "-":
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
