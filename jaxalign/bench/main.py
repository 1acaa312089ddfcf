"""The benchmark command: jaxalign's DPO step against TRL's DPOTrainer, side by side.

    python tools/bench.py --hidden 512 --layers 8 --heads 8 --vocab 32000 --batch 8 \
        --max-length 512 --json bench.json

Steps: build the workload (``jaxalign.bench.workload``); measure the peaks (float32 and
bfloat16 matmuls in JAX, plus PyTorch float32/bfloat16 when TRL runs); start one worker per variant and set each
up (compile, warm up); run ``--rounds`` rounds of one ``--steps``-step window per variant,
round-robin; summarise (``jaxalign.bench.report``), print the tables and write ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from jaxalign.bench.ours import OursVariant, ablation_ladder, serve_ours, with_tcmalloc, without_huge_pages
from jaxalign.bench.peak import serve_peak
from jaxalign.bench.session import Worker, interleave, preload_environment
from jaxalign.bench.trl_side import TRLVariant, serve_trl, trl_unavailable_reason
from jaxalign.bench.workload import FIXTURE, ModelSpec, build_workload
from jaxalign.runtime.huge_pages import huge_page_environment

__all__ = ["GROUPS", "OURS_VARIANTS", "TRL_VARIANTS", "main", "parse_args", "run_bench"]

HEADLINE = "jaxalign/+bfloat16"  # every feature, bfloat16 compute: compared with TRL's default (bf16 autocast)
HEADLINE_FLOAT32 = "jaxalign/+reference-cache"  # every feature in float32: compared with trl/float32
CACHE_OFF = "jaxalign/+packing"  # = HEADLINE_FLOAT32 with the reference forward in the step
_LADDER = ablation_ladder()
OURS_VARIANTS: dict[str, OursVariant] = {v.name: v for v in (
    *_LADDER, with_tcmalloc(_LADDER[-1]), without_huge_pages(_LADDER[-1]))}
TRL_VARIANTS: dict[str, TRLVariant] = {v.name: v for v in (
    TRLVariant("trl/default"),
    TRLVariant("trl/float32", bf16=False),
    TRLVariant("trl/float32-no-checkpointing", bf16=False, gradient_checkpointing=False),
    TRLVariant("trl/default-precompute-ref", precompute_ref_log_probs=True),
    TRLVariant("trl/default+huge-pages", huge_pages=True),
)}
# Names --variants accepts for several variants at once.
GROUPS: dict[str, tuple[str, ...]] = {
    "ladder": tuple(v.name for v in _LADDER),
    "trl": ("trl/default", "trl/float32"),
    "headline": (CACHE_OFF, HEADLINE_FLOAT32, HEADLINE, "trl/default", "trl/float32"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = heads")
    p.add_argument("--intermediate", type=int, default=0, help="0 = 8/3 * hidden rounded up to 64")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--data", default=str(FIXTURE), help="HH-RLHF (or standard-format) pairs; default: the fixture")
    p.add_argument("--variants", default="ladder,trl",
                   help=f"comma-separated variants or groups; variants: {', '.join([*OURS_VARIANTS, *TRL_VARIANTS])}; "
                        f"groups: " + "; ".join(f"{g} = {', '.join(v)}" for g, v in GROUPS.items()))
    p.add_argument("--no-trl", action="store_true", help="leave out every trl/* variant")
    p.add_argument("--allocator", default="",
                   help="malloc library LD_PRELOADed into every worker, e.g. tcmalloc_minimal (default: the C library's)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one window per variant each)")
    p.add_argument("--steps", type=int, default=4, help="steps per window")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads (XLA uses every core)")
    p.add_argument("--peak-n", type=int, default=3072, help="matmul size for the measured peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--workdir", default="runs/bench", help="where the model, pairs and worker files go")
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--markdown", help="write the tables here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a worker may take to answer")
    args = p.parse_args(argv)
    names: list[str] = []
    for item in (n.strip() for n in args.variants.split(",") if n.strip()):
        names += [n for n in GROUPS.get(item, (item,)) if n not in names]
    unknown = [n for n in names if n not in OURS_VARIANTS and n not in TRL_VARIANTS]
    if unknown:
        known = ", ".join([*OURS_VARIANTS, *TRL_VARIANTS, *GROUPS])
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {known}")
    if args.no_trl:
        names = [n for n in names if n not in TRL_VARIANTS]
    if not names:
        p.error("--variants: nothing to run")
    for name in ("batch", "max_length", "rounds", "steps", "threads", "peak_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    args.variant_names = names
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def _reference_cache(variants: dict[str, Any]) -> dict[str, float] | None:
    """Epoch time with the reference in the step (``+packing``) vs from the cache
    (``+reference-cache``, same other features); the cache build is the extra ``prepare`` time
    of the variant that built it over ``+packing``'s (includes compiling the reference forward)."""
    cached = variants.get(HEADLINE_FLOAT32)
    frozen = variants.get(CACHE_OFF)
    if not cached or not frozen:
        return None
    pairs = cached["setup"]["pairs_per_epoch"]
    e_frozen, e_cached = pairs / frozen["pairs_per_s"], pairs / cached["pairs_per_s"]
    out = {"epoch_s_frozen": e_frozen, "epoch_s_precomputed": e_cached, "speedup": e_frozen / e_cached,
           "pairs_per_epoch": pairs}
    builder = next((v for v in variants.values() if v["setup"].get("built_reference_cache")), None)
    if builder is not None:
        build = max(builder["setup"]["prepare_s"] - frozen["setup"]["prepare_s"], 0.0)
        out.update(cache_build_s=build, speedup_incl_cache_build=e_frozen / (e_cached + build))
    return out


def _workers(names: list[str], args: argparse.Namespace, workload: dict[str, Any], workdir: Path) -> list[Worker]:
    """One worker per variant, each with its own run directory."""
    common = dict(workload=workload, batch=args.batch, warmup_steps=args.warmup_steps, seed=args.seed,
                  learning_rate=args.learning_rate)
    planned_steps = args.warmup_steps + args.rounds * args.steps
    out = []
    for name in names:
        run_dir = str(workdir / "runs" / name.replace("/", "_").replace("+", ""))
        if name in OURS_VARIANTS:
            variant = OURS_VARIANTS[name]
            kwargs = {**common, "variant": variant, "workdir": run_dir, "cache_dir": str(workdir / "reference_cache"),
                      "planned_steps": planned_steps}
            env = preload_environment(variant.allocator or args.allocator, name)
            factory = serve_ours
        else:
            variant = TRL_VARIANTS[name]
            kwargs = {**common, "variant": variant, "workdir": run_dir, "threads": args.threads}
            env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
                   **preload_environment(args.allocator, name)}
            factory = serve_trl
        if variant.huge_pages:
            env.update(huge_page_environment(os.environ))
        out.append(Worker(name, factory, kwargs, env=env, timeout_s=args.timeout))
    return out


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark described by parsed ``args``; returns the result dict."""
    from jaxalign.perf.flops import param_counts
    from jaxalign.bench.report import summarize

    workdir = Path(args.workdir).resolve()
    spec = ModelSpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                     intermediate=args.intermediate, vocab=args.vocab)
    names = list(args.variant_names)
    trl_names = [n for n in names if n in TRL_VARIANTS]
    skipped = None
    if trl_names:
        skipped = trl_unavailable_reason()
        if skipped:
            _log(f"[bench] {skipped}")
            names = [n for n in names if n not in TRL_VARIANTS]
            trl_names = []
    _log(f"[bench] building the workload in {workdir}")
    workload = build_workload(workdir / "workload", spec, max_length=args.max_length, source=args.data, seed=args.seed)
    model_config = spec.model_config(max_position=args.max_length)
    counts = param_counts(model_config)
    wl = workload.to_dict()
    load_before = os.getloadavg()

    peak_worker = Worker("peak", serve_peak, {"n": args.peak_n, "repeats": 5,
                                              "torch_threads": args.threads if trl_names else None},
                         timeout_s=args.timeout)
    peak_worker.start()
    try:
        peaks_before = peak_worker.request("setup")
        workers = _workers(names, args, wl, workdir)
        raw = interleave(workers, rounds=args.rounds, steps=args.steps, log=_log)
        peaks_after = peak_worker.request("window", 0)
        peak_worker.request("finish")
    finally:
        peak_worker.stop()
    if peaks_before["backend"] == "cpu":
        peaks_used = {d: max(peaks_before[f"jax_{d}"]["flops_per_s"], peaks_after[f"jax_{d}"]["flops_per_s"])
                      for d in ("float32", "bfloat16")}
        peak_source = "measured JAX matmuls, best of before/after"
    else:
        vendor = peaks_before["vendor"]
        peaks_used = {"float32": vendor["tf32"] or peaks_before["jax_float32"]["flops_per_s"],
                      "bfloat16": vendor["bfloat16"] or peaks_before["jax_bfloat16"]["flops_per_s"]}
        peak_source = f"vendor dense peaks of {peaks_before['device_kind']} (tf32 for float32)"
    precision = {n: OURS_VARIANTS[n].dtype if n in OURS_VARIANTS else
                 ("bfloat16" if TRL_VARIANTS[n].bf16 else "float32") for n in names}
    kinds = {n: "jaxalign" if n in OURS_VARIANTS else "trl" for n in names}
    on_the_fly = {n: (OURS_VARIANTS.get(n) or TRL_VARIANTS[n]).on_the_fly_reference for n in names}
    ours_present = [n for n in names if n in OURS_VARIANTS]
    headline = HEADLINE if HEADLINE in names else (ours_present[-1] if ours_present else None)
    result = summarize(
        raw, kinds=kinds, on_the_fly=on_the_fly, flop_params=counts.flop_params,
        peak_flops_per_s={n: peaks_used[precision[n]] for n in names}, headline_float32=HEADLINE_FLOAT32,
        unembedding_params=counts.unembedding,
        ladder=list(OURS_VARIANTS), headline=headline,
        trl_default="trl/default" if "trl/default" in names else None,
        trl_float32="trl/float32" if "trl/float32" in names else None,
    )
    windows_load = [w["loadavg_1m"] for r in raw.values() for w in r["windows"]]
    result.update(
        reference_cache=_reference_cache(result["variants"]),
        peaks_used=peaks_used, peak_source=peak_source,
        peaks={"before": peaks_before, "after": peaks_after},
        flops={**dataclasses.asdict(counts), "flop_params": counts.flop_params,
               "convention": "6N policy fwd+bwd + 2N on-the-fly reference per real token; N = decoder blocks "
                             "+ final norm + hidden*vocab (LM-head matmul); input embedding excluded"},
        workload=wl, trl_skipped=skipped,
        settings={"batch": args.batch, "max_length": args.max_length, "rounds": args.rounds,
                  "steps": args.steps,
                  "warmup_steps": args.warmup_steps, "torch_threads": args.threads,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "variants": names, "seed": args.seed,
                  "learning_rate": args.learning_rate, "data": args.data, "allocator": args.allocator,
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        load={"before": list(load_before), "after": list(os.getloadavg()),
              "windows_mean": sum(windows_load) / len(windows_load) if windows_load else float("nan"),
              "windows_max": max(windows_load) if windows_load else float("nan")},
        machine=_machine(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "tools/bench.py", *sys.argv[1:]]),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    from jaxalign.bench.report import markdown

    args = parse_args(argv)
    result = run_bench(args)
    table = markdown(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
