"""The online benchmark: jaxalign's online DPO loop against TRL's ``OnlineDPOTrainer``, side by side.

    python tools/bench_online.py --json online.json --markdown online.md
    python tools/bench_online.py --quick            # a tiny run for CI

Both sides get the same checkpoint (``jaxalign.bench.workload``: Llama-style, random weights,
the byte-level BPE trained on the HH-RLHF fixture, 512 positions), the same prompts (the first
human turn of each fixture dialogue, ``"\\n\\nHuman: ...\\n\\nAssistant:"``, deduplicated, at
most ``MAX_PROMPT_TOKENS`` tokens, in ``prompts.jsonl``), the same reward
(``jaxalign.bench.online_reward``), 2 samples per prompt, ``--new-tokens`` new tokens at
``--temperature``, ``--batch`` pairs per optimizer step, one pass over each round's pairs,
float32, sequences up to 512 tokens (TRL's default ``max_length``).

* **jaxalign**: per repeat, ``python -m jaxalign.train --config configs/online_dpo.py`` in a
  fresh run directory (``jaxalign_command``): ``--rounds`` rounds of ``--prompts-per-round``
  prompts (P). The first ``--warmup-rounds`` compile and are left out; from the round rows of
  ``metrics.jsonl``: ``prompts/s = P * timed rounds / sum(time/generate_s + time/score_s +
  time/reference_s + time/train_s)``; the reference forward over the round's samples counts
  as train (TRL runs it inside its steps).
* **TRL**: one worker per variant (``jaxalign.bench.online_trl``), set up once (load,
  ``--warmup-steps`` steps), then per repeat one window of ``timed rounds * P / batch`` steps,
  the same number of prompts as jaxalign's timed rounds: ``prompts/s = prompts / seconds``.

Repeats alternate the order of the sides (A B C, C B A, ...), as the other benchmarks
interleave, so a change in machine load hits every side alike. Rates are totals over the
repeats; ratios are jaxalign's prompts/s over each TRL variant's, with the per-repeat range.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from jaxalign.bench.online_trl import OnlineTRLVariant, serve_online_trl
from jaxalign.bench.session import BenchError, Worker
from jaxalign.bench.workload import ModelSpec, build_workload

__all__ = ["GOAL_RATIO", "TRL_VARIANTS", "OnlineSettings", "jaxalign_command", "main", "markdown", "parse_args",
           "round_rows", "run", "run_jaxalign", "summarize", "trl_window", "window_from_rounds",
           "write_prompts"]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "online_dpo.py"
REWARD = "plain_text_reward"  # in jaxalign/bench/online_reward.py
MAX_LENGTH = 512  # tokens of prompt + completion: TRL's default max_length, and the checkpoint's positions
MAX_PROMPT_TOKENS = 64  # longer prompts are left out: rows of <= 64 + T tokens keep jaxalign in one or two buckets
BUCKETS = "(64,128,256,512)"  # jaxalign's padded row lengths up to MAX_LENGTH (base_config's default)
GOAL_RATIO = 3.0  # issue 19: jaxalign's prompts/s at least 3x TRL's
PHASES = ("generate_s", "score_s", "train_s")
TRL_VARIANTS: dict[str, OnlineTRLVariant] = {v.name: v for v in (
    OnlineTRLVariant("trl/float32"),  # TRL's defaults in float32: gradient checkpointing, so no KV cache in generate
    OnlineTRLVariant("trl/float32-no-checkpointing", gradient_checkpointing=False),
)}
QUICK = {"hidden": 32, "layers": 1, "heads": 2, "vocab": 512, "prompts_per_round": 4, "batch": 2,
         "new_tokens": 8, "rounds": 2, "repeats": 1, "warmup_steps": 1}


@dataclass(frozen=True)
class OnlineSettings:
    """What both sides run: P prompts per round, 2 samples each, B pairs per optimizer step."""

    prompts_per_round: int = 32
    batch: int = 8
    new_tokens: int = 64
    temperature: float = 0.9
    rounds: int = 3  # jaxalign rounds per run
    warmup_rounds: int = 1  # jaxalign's first rounds, which compile: not timed
    seed: int = 0

    @property
    def timed_rounds(self) -> int:
        return self.rounds - self.warmup_rounds

    @property
    def trl_steps(self) -> int:
        """TRL steps per window: the prompts of jaxalign's timed rounds, ``batch`` per step."""
        return self.timed_rounds * self.prompts_per_round // self.batch


def write_prompts(pairs_file: str | os.PathLike, out: str | os.PathLike, *, tokenizer_dir: str | os.PathLike,
                  max_tokens: int = MAX_PROMPT_TOKENS) -> int:
    """Writes ``{"prompt": first human turn}`` rows of the pairs' HH-RLHF prompts to ``out``
    (deduplicated, in order, at most ``max_tokens`` tokens with BOS); returns how many."""
    from jaxalign.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    prompts: dict[str, None] = {}
    with open(pairs_file, encoding="utf-8") as f:
        for line in f:
            first = json.loads(line)["prompt"].split("\n\nAssistant:", 1)[0] + "\n\nAssistant:"
            if len(tokenizer(first)["input_ids"]) <= max_tokens:
                prompts.setdefault(first, None)
    if not prompts:
        raise ValueError(f"{pairs_file}: no first turn of at most {max_tokens} tokens")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return len(prompts)


def round_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a run's metrics entries for rounds 1, 2, ... (those with a ``"round"``; round
    0, the evaluation before training, is left out), by round; raises ``ValueError`` on gaps
    or repeats."""
    rows = sorted((e for e in entries if int(e.get("round", 0)) >= 1), key=lambda e: int(e["round"]))
    numbers = [int(r["round"]) for r in rows]
    if numbers != list(range(1, len(rows) + 1)):
        raise ValueError(f"metrics.jsonl: round rows {numbers}, expected 1..{len(rows)}")
    return rows


def _round_split(row: dict[str, Any]) -> dict[str, float]:
    """A round's generate / score / train seconds; train includes ``time/reference_s`` (the
    reference forward over the round's samples), which TRL runs inside its steps."""
    return {"generate_s": float(row["time/generate_s"]), "score_s": float(row["time/score_s"]),
            "train_s": float(row["time/train_s"]) + float(row.get("time/reference_s", 0.0))}


def window_from_rounds(rows: Sequence[dict[str, Any]], prompts_per_round: int,
                       warmup_rounds: int = 1) -> dict[str, Any]:
    """One jaxalign window from its rows of rounds 1..R: the rounds after ``warmup_rounds``
    (which compile) are timed. ``tokens`` = sum of ``sampling/tokens_per_s * time/generate_s``
    (the sampled tokens); ``warmup_s``: the generate + score + train seconds of the others."""
    if len(rows) <= warmup_rounds:
        raise ValueError(f"metrics.jsonl: {len(rows)} round row(s); the benchmark needs more than the "
                         f"{warmup_rounds} warm-up round(s)")
    timed = rows[warmup_rounds:]
    splits = [_round_split(r) for r in timed]
    split = {p: sum(s[p] for s in splits) for p in PHASES}
    return {
        "rounds": len(timed), "prompts": float(prompts_per_round * len(timed)), "seconds": sum(split.values()),
        **split, "reference_s": sum(float(r.get("time/reference_s", 0.0)) for r in timed),
        "pairs": sum(float(r["online/pairs"]) for r in timed),
        "tokens": sum(float(r["sampling/tokens_per_s"]) * float(r["time/generate_s"]) for r in timed),
        "warmup_s": sum(sum(_round_split(r).values()) for r in rows[:warmup_rounds]),
    }


def jaxalign_command(*, model_dir: str, prompts_file: str, reward_file: str, settings: OnlineSettings, workdir: str,
                     cache_dir: str, config: str | os.PathLike = CONFIG, extra: Sequence[str] = ()) -> list[str]:
    """The ``python -m jaxalign.train`` command of one jaxalign run (``extra``: more overrides)."""
    s = settings
    return [
        sys.executable, "-m", "jaxalign.train", "--config", str(config), "--workdir", workdir,
        f"--config.model.path={model_dir}", f"--config.data.train={prompts_file}",
        f"--config.online.reward_function={reward_file}:{REWARD}", f"--config.online.rounds={s.rounds}",
        f"--config.online.prompts_per_round={s.prompts_per_round}", "--config.online.samples_per_prompt=2",
        f"--config.online.max_new_tokens={s.new_tokens}", f"--config.online.temperature={s.temperature}",
        "--config.online.eval_prompts=0", "--config.online.epochs=1", f"--config.data.batch_size={s.batch}",
        f"--config.data.micro_batch_size={s.batch}", f"--config.data.max_length={MAX_LENGTH}",
        f"--config.data.max_prompt_length={MAX_LENGTH - s.new_tokens}", f"--config.data.buckets={BUCKETS}",
        "--config.data.packing=False", "--config.model.dtype=float32", f"--config.seed={s.seed}",
        "--config.progress_bar=False", "--config.checkpoint.export=False",
        f"--config.compilation_cache_dir={cache_dir}", *extra,
    ]


def child_environment(threads: int) -> dict[str, str]:
    """The parent's environment for a jaxalign run, with ``OMP_NUM_THREADS`` set and without
    ``--xla_force_host_platform_device_count`` (the test suite's fake devices)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_jaxalign(command: list[str], *, workdir: str, settings: OnlineSettings, threads: int,
                 timeout_s: float) -> dict[str, Any]:
    """Runs ``command`` in a fresh ``workdir`` (output in ``workdir/train.log``); returns its
    window, with the whole process's wall and CPU seconds (``process_s``, ``process_cpu_s``)."""
    from jaxalign.train.metrics import read_metrics

    shutil.rmtree(workdir, ignore_errors=True)
    Path(workdir).mkdir(parents=True)
    log = Path(workdir) / "train.log"
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(command, env=child_environment(threads), stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s, check=False).returncode
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise BenchError(f"jaxalign: exit code {code} from\n  {shlex.join(command)}\n{log} ends with:\n{tail}")
    window = window_from_rounds(round_rows(read_metrics(workdir)), settings.prompts_per_round, settings.warmup_rounds)
    if window["rounds"] != settings.timed_rounds:
        raise BenchError(f"jaxalign: {window['rounds'] + settings.warmup_rounds} rounds in {workdir}/metrics.jsonl, "
                         f"expected {settings.rounds}")
    return {**window, "process_s": wall, "process_cpu_s": cpu}


def trl_window(worker: Worker, steps: int) -> dict[str, Any]:
    """One TRL window of ``steps`` steps, with ``train_s`` = its seconds - generate - score."""
    window = worker.request("window", steps)
    return {**window, "train_s": window["seconds"] - window["generate_s"] - window["score_s"]}


def _spread(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


def _cores_used(ws: list[dict[str, Any]]) -> float | None:
    """CPU seconds over wall seconds: TRL's timed steps, or jaxalign's whole process."""
    if all("cpu_s" in w for w in ws):
        return sum(w["cpu_s"] for w in ws) / sum(w["seconds"] for w in ws)
    if all("process_cpu_s" in w for w in ws):
        return sum(w["process_cpu_s"] for w in ws) / sum(w["process_s"] for w in ws)
    return None


def summarize(windows: dict[str, list[dict[str, Any]]], prompts_per_round: int) -> dict[str, Any]:
    """Per side: prompts/s (total, and min/median/max over windows), the split in seconds per
    ``prompts_per_round`` prompts and in shares of the time, the cores it got; jaxalign's
    ratio to each other side."""
    sides: dict[str, Any] = {}
    for name, ws in windows.items():
        seconds, prompts = sum(w["seconds"] for w in ws), sum(w["prompts"] for w in ws)
        per_round = prompts_per_round / prompts
        generate = sum(w["generate_s"] for w in ws)
        sides[name] = {
            "prompts_per_s": prompts / seconds,
            "prompts_per_s_min_median_max": _spread([w["prompts"] / w["seconds"] for w in ws]),
            "seconds_per_round": seconds * per_round,
            "split_seconds_per_round": {p: sum(w[p] for w in ws) * per_round for p in PHASES},
            "split_share": {p: sum(w[p] for w in ws) / seconds for p in PHASES},
            "sampled_tokens_per_s": sum(w["tokens"] for w in ws) / generate if generate else None,
            "pairs_per_round": sum(w["pairs"] for w in ws) * per_round, "cores_used": _cores_used(ws),
            "measured_seconds": seconds, "measured_prompts": prompts, "windows": len(ws),
        }
    out: dict[str, Any] = {"sides": sides, "ratios": {}}
    ours = windows.get("jaxalign")
    for name, ws in windows.items():
        if name != "jaxalign" and ours:
            out["ratios"][name] = {
                "prompts_per_s": sides["jaxalign"]["prompts_per_s"] / sides[name]["prompts_per_s"],
                "per_repeat": [(a["prompts"] / a["seconds"]) / (b["prompts"] / b["seconds"]) for a, b in zip(ours, ws)],
            }
    if out["ratios"]:
        fastest = max((n for n in out["ratios"]), key=lambda n: sides[n]["prompts_per_s"])
        ratio = out["ratios"][fastest]["prompts_per_s"]
        out["headline"] = {"trl_variant": fastest, "ratio": ratio, "goal_ratio": GOAL_RATIO,
                           "goal_met": ratio >= GOAL_RATIO}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench_online.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--quick", action="store_true",
                   help="tiny CI-sized run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + " (flags given explicitly win)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = heads")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompts-per-round", type=int, default=32, help="P: prompts per jaxalign round")
    p.add_argument("--batch", type=int, default=8, help="B: pairs (prompts) per optimizer step, both sides")
    p.add_argument("--new-tokens", type=int, default=64, help="T: max new tokens per sample (TRL's default 64)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=3, help="jaxalign rounds per run, warm-up rounds included")
    p.add_argument("--warmup-rounds", type=int, default=1, help="jaxalign's first rounds (they compile): not timed")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats: one window per side each")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed TRL steps before its first window")
    p.add_argument("--trl", default=",".join(TRL_VARIANTS),
                   help=f"comma-separated TRL variants: {', '.join(TRL_VARIANTS)}")
    p.add_argument("--no-trl", action="store_true", help="jaxalign only")
    p.add_argument("--no-jaxalign", action="store_true", help="TRL only")
    p.add_argument("--config", default=str(CONFIG), help="jaxalign's online recipe")
    p.add_argument("--jaxalign-arg", action="append", default=[], metavar="--config.KEY=VALUE",
                   help="one more override for every jaxalign run, in the = form: "
                        "--jaxalign-arg=--config.log_every=1 (repeatable)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="PyTorch threads and OMP_NUM_THREADS (XLA uses one thread per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench_online")
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--markdown", help="write the tables here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a side may take for one window")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)}
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    args.trl_names = [] if args.no_trl else [n.strip() for n in args.trl.split(",") if n.strip()]
    unknown = [n for n in args.trl_names if n not in TRL_VARIANTS]
    if unknown:
        p.error(f"--trl: unknown {', '.join(unknown)}; known: {', '.join(TRL_VARIANTS)}")
    if args.no_jaxalign and not args.trl_names:
        p.error("nothing to run: --no-jaxalign without TRL variants")
    for name in ("hidden", "layers", "heads", "vocab", "prompts_per_round", "batch", "new_tokens", "repeats",
                 "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0 or args.warmup_rounds < 0:
        p.error("--warmup-steps and --warmup-rounds must be >= 0")
    if args.rounds <= args.warmup_rounds:
        p.error(f"--rounds must be more than --warmup-rounds ({args.warmup_rounds})")
    if args.prompts_per_round % args.batch:
        p.error(f"--prompts-per-round {args.prompts_per_round} must be a multiple of --batch {args.batch}")
    if not args.no_jaxalign and not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such recipe (--no-jaxalign runs TRL only)")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rate(w: dict[str, Any]) -> str:
    split = ", ".join(f"{p.removesuffix('_s')} {w[p]:.2f} s" for p in PHASES)
    return f"{w['prompts'] / w['seconds']:.2f} prompts/s ({w['seconds']:.1f} s: {split}; load {w['loadavg_1m']:.2f})"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from jaxalign.bench import online_reward
    from jaxalign.bench.main import _machine
    from jaxalign.bench.trl_side import trl_unavailable_reason

    workdir = Path(args.workdir).resolve()
    settings = OnlineSettings(prompts_per_round=args.prompts_per_round, batch=args.batch, new_tokens=args.new_tokens,
                              temperature=args.temperature, rounds=args.rounds, warmup_rounds=args.warmup_rounds,
                              seed=args.seed)
    spec = ModelSpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                     vocab=args.vocab)
    trl_names = list(args.trl_names)
    skipped = trl_unavailable_reason() if trl_names else None
    if skipped:
        if args.no_jaxalign:
            raise BenchError(f"nothing to run: {skipped}")
        _log(f"[bench_online] {skipped}")
        trl_names = []
    _log(f"[bench_online] building the workload in {workdir}")
    workload = build_workload(workdir / "workload", spec, max_length=MAX_LENGTH, seed=args.seed)
    prompts_file = str(workdir / "workload" / "prompts.jsonl")
    num_prompts = write_prompts(workload.pairs_file, prompts_file, tokenizer_dir=workload.model_dir)
    reward_file = online_reward.__file__
    load_before = os.getloadavg()
    workers = [Worker(name, serve_online_trl, dict(
        model_dir=workload.model_dir, prompts_file=prompts_file, variant=TRL_VARIANTS[name], batch=settings.batch,
        new_tokens=settings.new_tokens, temperature=settings.temperature, warmup_steps=args.warmup_steps,
        workdir=str(workdir / "trl" / name.replace("/", "_")), threads=args.threads, seed=settings.seed),
        env={"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}, timeout_s=args.timeout)
        for name in trl_names]
    sides = ([] if args.no_jaxalign else ["jaxalign"]) + trl_names
    windows: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    setups: dict[str, Any] = {} if args.no_jaxalign else {
        "jaxalign": {f"{m}_version": metadata.version(m) for m in ("jax", "jaxlib", "flax")}}
    finishes: dict[str, Any] = {}
    commands: list[str] = []
    try:
        for w in workers:
            _log(f"[bench_online] setting up {w.name}")
            start = time.perf_counter()
            w.start()
            setups[w.name] = {**w.request("setup"), "setup_wall_s": time.perf_counter() - start}
        by_name = {w.name: w for w in workers}
        for r in range(args.repeats):
            for name in (sides if r % 2 == 0 else sides[::-1]):
                if name == "jaxalign":
                    run_dir = str(workdir / "jaxalign" / f"repeat-{r + 1}")
                    command = jaxalign_command(
                        model_dir=workload.model_dir, prompts_file=prompts_file, reward_file=reward_file,
                        settings=settings, workdir=run_dir, cache_dir=str(workdir / "jaxalign" / "xla_cache"),
                        config=args.config, extra=args.jaxalign_arg)
                    commands.append(shlex.join(command))
                    window = run_jaxalign(command, workdir=run_dir, settings=settings, threads=args.threads,
                                          timeout_s=args.timeout)
                else:
                    window = trl_window(by_name[name], settings.trl_steps)
                window["loadavg_1m"] = os.getloadavg()[0]
                windows[name].append(window)
                _log(f"[bench_online] repeat {r + 1}/{args.repeats} {name}: {_rate(window)}")
        for w in workers:
            finishes[w.name] = w.request("finish")
    finally:
        for w in workers:
            w.stop()
    result = summarize(windows, settings.prompts_per_round)
    for name, side in result["sides"].items():
        side.update(windows_raw=windows[name], setup=setups.get(name), finish=finishes.get(name))
    loads = [w["loadavg_1m"] for ws in windows.values() for w in ws]
    result.update(
        settings={**asdict(settings), "timed_rounds": settings.timed_rounds, "trl_steps_per_window": settings.trl_steps,
                  "samples_per_prompt": 2, "dtype": "float32", "repeats": args.repeats,
                  "warmup_steps": args.warmup_steps, "threads": args.threads, "trl_variants": trl_names,
                  "jaxalign_config": None if args.no_jaxalign else str(args.config),
                  "jaxalign_extra_args": list(args.jaxalign_arg), "reward_function": f"{reward_file}:{REWARD}"},
        workload={**workload.to_dict(), "prompts_file": prompts_file, "num_prompts": num_prompts},
        trl_skipped=skipped, jaxalign_commands=commands,
        load={"before": list(load_before), "after": list(os.getloadavg()),
              "windows_mean": sum(loads) / len(loads), "windows_max": max(loads)},
        machine=_machine(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["python", "tools/bench_online.py", *(sys.argv[1:] if sys.argv[0].endswith(
            "bench_online.py") else [])]),
    )
    return result


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/performance.md for one run."""
    s, st, w = result["workload"]["spec"], result["settings"], result["workload"]
    versions = {k: v for side in result["sides"].values() for k, v in (side["setup"] or {}).items()
                if k.endswith("_version")}
    p = st["prompts_per_round"]
    lines = [
        f"model: hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, vocab {s['vocab']}, float32; "
        f"{w['num_prompts']} prompts; {p} prompts per round x 2 samples, {st['new_tokens']} new tokens, "
        f"temperature {st['temperature']:g}, {st['batch']} pairs per optimizer step; jaxalign {st['rounds']} rounds "
        f"per run ({st['warmup_rounds']} not timed), TRL {st['trl_steps_per_window']} steps per window after "
        f"{st['warmup_steps']} warm-up steps; {st['repeats']} repeats; threads {st['threads']}; "
        + ", ".join(f"{k.removesuffix('_version')} {v}" for k, v in versions.items())
        + f"; CPU {result['machine']['cpu']} ({result['machine']['cores']} cores); load during windows "
        f"{result['load']['windows_mean']:.2f} (max {result['load']['windows_max']:.2f})",
        "",
        f"| side | prompts/s (min-max) | s per {p} prompts | generate s (share) | score s (share) | train s (share) "
        f"| sampled tokens/s | pairs per {p} prompts | cores used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["sides"].items():
        lo, _, hi = v["prompts_per_s_min_median_max"]
        split = " | ".join(f"{v['split_seconds_per_round'][ph]:.2f} ({100 * v['split_share'][ph]:.0f}%)"
                           for ph in PHASES)
        tps, cores = v["sampled_tokens_per_s"], v["cores_used"]
        lines.append(f"| {name} | {v['prompts_per_s']:.2f} ({lo:.2f}-{hi:.2f}) | {v['seconds_per_round']:.2f} | "
                     f"{split} | {'-' if tps is None else f'{tps:.0f}'} | {v['pairs_per_round']:.1f} | "
                     f"{'-' if cores is None else f'{cores:.2f}'} |")
    lines += ["", "cores used: CPU seconds over wall seconds, of TRL's timed steps and of jaxalign's whole process "
                  "(start-up and compilation included)"]
    if result["ratios"]:
        lines += ["", "| ratio (prompts/s) | value (per-repeat range) |", "|---|---|"]
        for name, r in result["ratios"].items():
            lines.append(f"| jaxalign / {name} | **{r['prompts_per_s']:.2f}x** "
                         f"({min(r['per_repeat']):.2f}-{max(r['per_repeat']):.2f}) |")
        h = result["headline"]
        lines += ["", f"goal (jaxalign >= {h['goal_ratio']:g}x the faster TRL variant, {h['trl_variant']}): "
                      f"{h['ratio']:.2f}x, {'met' if h['goal_met'] else 'not met'}"]
    if result.get("trl_skipped"):
        lines += ["", result["trl_skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
