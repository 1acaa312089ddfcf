"""tools/bench_sample.py end to end on a tiny spec: both sides sample the same number of tokens."""

import json

import pytest

from jaxalign.bench.sampling import main, summarize_case
from jaxalign.bench.sampling_sides import Case, kv_cache_bytes
from jaxalign.bench.trl_side import trl_unavailable_reason

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "512", "--rows", "4", "--samples", "1",
        "--modes", "greedy", "--prompt-length", "16", "--new-tokens", "8", "--rounds", "1"]


@pytest.mark.slow
@pytest.mark.skipif(trl_unavailable_reason() is not None, reason="transformers/torch not installed")
def test_both_sides_sample_the_same_tokens(tmp_path):
    path = tmp_path / "out.json"
    assert main([*TINY, "--workdir", str(tmp_path / "work"), "--json", str(path),
                 "--markdown", str(tmp_path / "t.md")]) == 0
    result = json.loads(path.read_text())
    (case,) = result["cases"]
    assert set(case["sides"]) == {"jaxalign", "transformers"}
    for side in case["sides"].values():
        assert side["tokens_per_call"] == [4 * 8] and side["rows"] == [4]
        assert side["tokens_per_s"]["median"] > 0 and side["weight_bytes"] > 0
    assert case["tokens_equal"]
    ours, theirs = case["sides"]["jaxalign"], case["sides"]["transformers"]
    assert ours["weight_bytes"] == theirs["weight_bytes"]  # the same checkpoint on both sides
    assert case["ratio_tokens_per_s"] == pytest.approx(
        ours["tokens_per_s"]["median"] / theirs["tokens_per_s"]["median"])
    assert ours["compiled_programs"][0] == ours["setup"]["compiled_programs"]  # the timed call compiled nothing
    assert ours["compile_s"] > 0 and ours["compile_s_in_timed_calls"] == [0.0]
    assert case["greedy_token_agreement"] > 0.9  # same weights, same prompts: the same argmaxes
    assert "| 4 (4 x 1) | greedy | jaxalign |" in (tmp_path / "t.md").read_text()


def test_summary_ratio_and_floor():
    case = Case(rows=8, samples=4, temperature=0.0, new_tokens=5)
    setup = {"one_token_call_s": 0.5, "first_call_s": 3.0, "load_s": 1.0, "weight_bytes": 100, "compile_s": 1.25}
    windows = [{"seconds": s, "cpu_s": 2 * s, "tokens": 40, "rows": 8, "rss_before_bytes": 1000, "call_peak_rss_bytes": 1300}
               for s in (1.0, 2.0, 1.5)]
    raw = {"jaxalign": {"setup": setup, "windows": windows, "finish": {"peak_rss_bytes": 2000}},
           "transformers": {"setup": setup, "windows": [{**w, "seconds": 4 * w["seconds"]} for w in windows],
                            "finish": {"peak_rss_bytes": 2000}}}
    out = summarize_case(case, raw, floor_kv=200, prompt_length=16)
    assert out["ratio_tokens_per_s"] == pytest.approx(4.0) and out["ratio_per_round"] == pytest.approx([4.0] * 3)
    ours = out["sides"]["jaxalign"]
    assert ours["tokens_per_s"]["median"] == pytest.approx(40 / 1.5)
    assert ours["decode_step_ms_estimate"] == pytest.approx(1000 * (1.5 - 0.5) / 4)
    assert ours["compile_s"] == 1.25 and ours["cores_used"]["median"] == pytest.approx(2.0)
    assert ours["floor_bytes"] == 300 and ours["call_increase_over_kv"] == pytest.approx(300 / 200)
    kv = kv_cache_bytes(layers=8, rows=64, slots=256, kv_heads=8, head_dim=64, dtype_bytes=4)
    assert kv == 2 * 8 * 64 * 256 * 512 * 4


def test_samples_must_divide_rows(capsys):
    with pytest.raises(SystemExit):
        main(["--rows", "6", "--samples", "4"])
    assert "--samples must divide every --rows" in capsys.readouterr().err
