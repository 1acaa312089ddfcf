"""tools/bench_online.py: the reward rule, jaxalign's round rows, the TRL worker, the summary, end to end."""

import json
import math
import os
import sys
import time

import pytest

from jaxalign.bench.online import (
    OnlineSettings, jaxalign_command, main, markdown, parse_args, round_rows, run_jaxalign, summarize, trl_window,
    window_from_rounds, write_prompts,
)
from jaxalign.bench.online_reward import TARGET_CHARS, plain_text_reward
from jaxalign.bench.online_trl import OnlineTRLVariant, serve_online_trl
from jaxalign.bench.session import BenchError, Worker
from jaxalign.bench.trl_side import trl_unavailable_reason
from jaxalign.train.metrics import read_metrics

TRL_REASON = trl_unavailable_reason()


def _round(n: int, generate: float, score: float, reference: float, train: float, pairs: int = 4) -> dict:
    return {"step": 2 * n, "round": float(n), "online/pairs": pairs, "time/generate_s": generate,
            "time/score_s": score, "time/reference_s": reference, "time/train_s": train,
            "sampling/tokens_per_s": 100.0 / generate}


def test_reward_rule():
    plain = "a" * TARGET_CHARS
    assert plain_text_reward(["p"], [plain]) == [1.0]
    noisy, short = plain_text_reward(["p", "p"], ["#" * TARGET_CHARS, "ab"], completion_ids=[[1], [2]])
    assert noisy == 0.0 and short == pytest.approx(1.0 - (TARGET_CHARS - 2) / TARGET_CHARS)
    assert plain_text_reward(["p"], [""]) == [-1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        plain_text_reward(["p", "q"], ["x"])


def test_window_from_hand_written_metrics(tmp_path):
    rows = [{"step": 0, "round": 0.0},  # the evaluation before training: no timings
            {"step": 2, "loss": 0.69, "steps_per_second": 0.5},  # a training-step row
            _round(1, 5.0, 0.5, 1.0, 9.0), {"step": 4, "loss": 0.68},
            _round(3, 0.5, 0.25, 0.25, 1.0, pairs=3), _round(2, 1.0, 0.25, 0.25, 2.5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_round = round_rows(read_metrics(tmp_path))
    assert [r["round"] for r in by_round] == [1, 2, 3]
    w = window_from_rounds(by_round, prompts_per_round=4)
    assert w["rounds"] == 2 and w["prompts"] == 8 and w["pairs"] == 7
    assert (w["generate_s"], w["score_s"], w["train_s"], w["reference_s"]) == (1.5, 0.5, 4.0, 0.5)
    assert w["seconds"] == 6.0 and w["warmup_s"] == 15.5  # train includes the reference forward
    assert w["tokens"] == pytest.approx(200.0)
    assert window_from_rounds(by_round, 4, warmup_rounds=2)["seconds"] == 2.0
    with pytest.raises(ValueError, match="more than the 3 warm-up"):
        window_from_rounds(by_round, 4, warmup_rounds=3)
    with pytest.raises(ValueError, match=r"round rows \[1, 3\], expected 1..2"):
        round_rows([rows[2], rows[4]])


def test_jaxalign_command_follows_the_driver_contract():
    s = OnlineSettings(prompts_per_round=16, batch=4, new_tokens=32, rounds=4)
    cmd = jaxalign_command(model_dir="M", prompts_file="P.jsonl", reward_file="/r.py", settings=s, workdir="W",
                           cache_dir="C", extra=["--config.log_every=1"])
    assert cmd[1:4] == ["-m", "jaxalign.train", "--config"] and cmd[cmd.index("--workdir") + 1] == "W"
    for flag in ("--config.model.path=M", "--config.data.train=P.jsonl",
                 "--config.online.reward_function=/r.py:plain_text_reward", "--config.online.rounds=4",
                 "--config.online.prompts_per_round=16", "--config.online.samples_per_prompt=2",
                 "--config.online.max_new_tokens=32", "--config.online.temperature=0.9",
                 "--config.online.eval_prompts=0", "--config.online.epochs=1", "--config.data.batch_size=4",
                 "--config.data.micro_batch_size=4", "--config.model.dtype=float32",
                 "--config.compilation_cache_dir=C"):
        assert flag in cmd, flag
    assert cmd[-1] == "--config.log_every=1" and s.timed_rounds == 3 and s.trl_steps == 12


_FAKE_RUN = """
import json, os, sys
assert "device_count" not in os.environ["XLA_FLAGS"] and os.environ["OMP_NUM_THREADS"] == "3"
rows = [{"step": 0, "round": 0}] + [
    {"step": r, "round": r, "online/pairs": 2, "time/generate_s": 1.0, "time/score_s": 0.5,
     "time/reference_s": 0.5, "time/train_s": 2.0, "sampling/tokens_per_s": 10.0} for r in (1, 2, 3)]
with open(os.path.join(sys.argv[1], "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\\n" for r in rows)
"""


def test_run_jaxalign_reads_the_run_it_started(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_use_thunk_runtime=true")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 9, "round": 7}\n')  # a stale run: removed first
    settings = OnlineSettings(prompts_per_round=4, batch=2, rounds=3)
    w = run_jaxalign([sys.executable, "-c", _FAKE_RUN, str(workdir)], workdir=str(workdir), settings=settings,
                     threads=3, timeout_s=60)
    assert w["rounds"] == 2 and w["prompts"] == 8 and w["seconds"] == 8.0 and w["tokens"] == 20.0
    assert w["process_s"] > 0
    with pytest.raises(BenchError, match=r"(?s)exit code 3.*boom"):
        run_jaxalign([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], workdir=str(workdir),
                     settings=settings, threads=1, timeout_s=60)
    with pytest.raises(BenchError, match="3 rounds in .*, expected 4"):
        run_jaxalign([sys.executable, "-c", _FAKE_RUN, str(workdir)], workdir=str(workdir),
                     settings=OnlineSettings(prompts_per_round=4, batch=2, rounds=4), threads=3, timeout_s=60)


def _window(seconds: float, generate: float, prompts: float = 8.0) -> dict:
    return {"prompts": prompts, "pairs": prompts, "tokens": 100.0, "seconds": seconds, "generate_s": generate,
            "score_s": 0.1 * seconds, "train_s": 0.9 * seconds - generate}


def test_summary_ratios_split_and_tables():
    windows = {"jaxalign": [{**_window(1.0, 0.4), "process_s": 10.0, "process_cpu_s": 15.0},
                            {**_window(2.0, 0.5), "process_s": 10.0, "process_cpu_s": 17.0}],
               "trl/a": [{**_window(8.0, 4.0), "cpu_s": 16.0}, {**_window(4.0, 2.0), "cpu_s": 2.0}],
               "trl/b": [_window(8.0, 1.0), _window(8.0, 1.0)]}
    out = summarize(windows, prompts_per_round=8)
    assert out["sides"]["jaxalign"]["cores_used"] == 1.6 and out["sides"]["trl/a"]["cores_used"] == 1.5
    assert out["sides"]["trl/b"]["cores_used"] is None
    ours = out["sides"]["jaxalign"]
    assert ours["prompts_per_s"] == pytest.approx(16 / 3) and ours["seconds_per_round"] == pytest.approx(1.5)
    assert ours["prompts_per_s_min_median_max"] == pytest.approx([4.0, 6.0, 8.0])
    assert ours["split_seconds_per_round"]["generate_s"] == pytest.approx(0.45)
    assert sum(ours["split_share"].values()) == pytest.approx(1.0)
    assert ours["sampled_tokens_per_s"] == pytest.approx(200 / 0.9)
    assert out["ratios"]["trl/a"]["prompts_per_s"] == pytest.approx(4.0)
    assert out["ratios"]["trl/a"]["per_repeat"] == pytest.approx([8.0, 2.0])
    assert out["headline"] == {"trl_variant": "trl/a", "ratio": pytest.approx(4.0), "goal_ratio": 3.0,
                               "goal_met": True}
    result = {**out, "workload": {"spec": {"hidden": 32, "layers": 1, "heads": 2, "vocab": 512}, "num_prompts": 9},
              "settings": {"prompts_per_round": 8, "new_tokens": 8, "temperature": 0.9, "batch": 2, "rounds": 2,
                           "warmup_rounds": 1, "trl_steps_per_window": 4, "warmup_steps": 1, "repeats": 2,
                           "threads": 2},
              "machine": {"cpu": "cpu", "cores": 2}, "load": {"windows_mean": 1.0, "windows_max": 2.0}}
    for side in result["sides"].values():
        side["setup"] = None
    table = markdown(result)
    assert "| jaxalign | 5.33 (4.00-8.00) | 1.50 | 0.45 (30%) |" in table
    assert "| jaxalign / trl/a | **4.00x** (2.00-8.00) |" in table and "4.00x, met" in table


def test_arguments(capsys):
    args = parse_args(["--quick", "--batch=4", "--hidden", "256", "--no-jaxalign"])
    assert (args.hidden, args.prompts_per_round, args.batch, args.rounds) == (256, 4, 4, 2)  # explicit flags win
    assert parse_args(["--no-trl"]).trl_names == []
    for argv, message in ((["--prompts-per-round", "6", "--batch", "4"], "must be a multiple of --batch 4"),
                          (["--rounds", "2", "--warmup-rounds", "2"], "--rounds must be more than --warmup-rounds"),
                          (["--trl", "trl/nope"], "--trl: unknown trl/nope"),
                          (["--config", "no/such.py"], "no such recipe")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_write_prompts(tmp_path):
    from jaxalign.tokenizers import build_bpe_tokenizer

    tok = build_bpe_tokenizer(tmp_path / "tok", vocab_size=300, corpus=["Human: hello there Assistant: hi"] * 4)
    prompts = ["\n\nHuman: hello\n\nAssistant: hi\n\nHuman: more\n\nAssistant:", "\n\nHuman: hello\n\nAssistant:",
               "\n\nHuman: " + "x y z " * 40 + "\n\nAssistant:"]
    pairs = [{"prompt": p, "chosen": "a", "rejected": "b"} for p in prompts]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert write_prompts(tmp_path / "pairs.jsonl", tmp_path / "prompts.jsonl", tokenizer_dir=tok, max_tokens=64) == 1
    assert [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()] == [
        {"prompt": "\n\nHuman: hello\n\nAssistant:"}]


@pytest.fixture(scope="module")
def tiny_workload(tmp_path_factory):
    from jaxalign.bench.workload import ModelSpec, build_workload

    root = tmp_path_factory.mktemp("online")
    workload = build_workload(root / "workload", ModelSpec(hidden=32, layers=1, heads=2, vocab=512), max_length=512)
    prompts = root / "prompts.jsonl"
    write_prompts(workload.pairs_file, prompts, tokenizer_dir=workload.model_dir)
    return workload, str(prompts), root


@pytest.mark.slow
@pytest.mark.skipif(TRL_REASON is not None, reason=str(TRL_REASON))
def test_trl_side_times_generate_score_and_train(tiny_workload):
    workload, prompts, root = tiny_workload
    batch, new_tokens = 2, 6
    worker = Worker("trl", serve_online_trl, dict(
        model_dir=workload.model_dir, prompts_file=prompts, variant=OnlineTRLVariant("trl/float32"), batch=batch,
        new_tokens=new_tokens, temperature=0.9, warmup_steps=1, workdir=str(root / "trl"), threads=1, seed=0),
        env={"OMP_NUM_THREADS": "1"}, timeout_s=600)
    worker.start()
    try:
        setup = worker.request("setup")
        start = time.perf_counter()
        w = trl_window(worker, 2)
        wall = time.perf_counter() - start
        finish = worker.request("finish")
    finally:
        worker.stop()
    assert setup["model_dtype"] == "torch.float32" and setup["mixed_precision"] == "no"
    assert setup["gradient_checkpointing"] and not setup["generate_use_cache"] and setup["torch_threads"] == 1
    assert w["steps"] == 2 and w["prompts"] == w["pairs"] == 2 * batch
    assert 0 < w["tokens"] <= 2 * batch * 2 * new_tokens
    assert w["prompts"] / w["seconds"] > 0 and w["seconds"] <= wall
    assert w["generate_s"] > 0 and w["score_s"] > 0 and w["train_s"] > 0
    assert w["generate_s"] + w["score_s"] + w["train_s"] == pytest.approx(w["seconds"])
    assert finish["peak_rss_bytes"] > 0 and finish["pid"] != os.getpid()


@pytest.mark.slow
def test_end_to_end_quick(tmp_path):
    """Both sides on the --quick settings: needs jaxalign's online driver (configs/online_dpo.py)."""
    path = tmp_path / "out.json"
    assert main(["--quick", "--workdir", str(tmp_path / "work"), "--json", str(path),
                 "--markdown", str(tmp_path / "t.md")]) == 0
    result = json.loads(path.read_text())
    expected = {"jaxalign"} | (set() if TRL_REASON else {"trl/float32", "trl/float32-no-checkpointing"})
    assert set(result["sides"]) == expected
    for name, side in result["sides"].items():
        assert side["prompts_per_s"] > 0 and side["measured_prompts"] == 4, name
        assert math.isclose(sum(side["split_share"].values()), 1.0), name
    ours = result["sides"]["jaxalign"]["windows_raw"][0]
    assert ours["rounds"] == 1 and ours["pairs"] <= 4 and ours["tokens"] <= 4 * 2 * 8
    if not TRL_REASON:
        assert result["headline"]["ratio"] == pytest.approx(min(r["prompts_per_s"] for r in result["ratios"].values()))
    assert "| jaxalign |" in (tmp_path / "t.md").read_text()
