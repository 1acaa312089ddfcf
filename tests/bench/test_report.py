"""Rates, MFU, ratios and ablation factors from hand-made windows."""

import pytest

from jaxalign.bench.ours import ablation_ladder
from jaxalign.data.batching import bucket_ladder
from jaxalign.bench.report import markdown, summarize


def _raw(pairs_per_window, seconds, tokens_per_pair=100.0):
    windows = [{"steps": 2, "seconds": s, "pairs": p, "tokens": p * tokens_per_pair, "row_slots": 2 * p * tokens_per_pair,
                "completion_tokens": p * 10, "loadavg_1m": 0.5} for p, s in zip(pairs_per_window, seconds)]
    return {"setup": {"compile_s": 1.0}, "windows": windows, "finish": {"peak_rss_bytes": 2**30, "last_loss": 0.69}}


def test_summary_numbers():
    raw = {"a": _raw([4, 4], [2.0, 2.0]), "b": _raw([8, 4], [1.0, 3.0]), "t": _raw([2, 2], [4.0, 4.0])}
    out = summarize(raw, kinds={"a": "jaxalign", "b": "jaxalign", "t": "trl"},
                    on_the_fly={"a": True, "b": False, "t": True}, flop_params=1000,
                    peak_flops_per_s={"a": 1e7, "b": 1e7, "t": 1e7},
                    unembedding_params=400, ladder=["a", "b"], headline="b", trl_default="t", trl_float32=None)
    a, b, t = (out["variants"][k] for k in "abt")
    assert a["pairs_per_s"] == 2.0 and t["pairs_per_s"] == 0.5
    assert b["pairs_per_s"] == 12 / 4.0  # totals over windows, not a mean of per-window rates
    assert b["pairs_per_s_min_median_max"] == [4 / 3, pytest.approx((8 + 4 / 3) / 2), 8.0]
    assert a["tokens_per_s"] == 200.0 and a["padding_efficiency"] == 0.5
    assert a["model_flops_per_s"] == 8 * 1000 * 200.0 and a["mfu"] == pytest.approx(0.16)
    assert b["model_flops_per_s"] == 6 * 1000 * 300.0  # the cache removes the 2N reference forward
    # Stricter count: the 400 unembedding parameters only for the 10 scored tokens of each pair.
    assert a["scored_token_share"] == pytest.approx(0.1)
    assert a["mfu_scored_lm_head"] * 1e7 == pytest.approx(8 * (600 * 200.0 + 400 * 20.0))
    assert out["pairs_per_s"] == 3.0 and out["mfu"] == b["mfu"] and out["compile_s"] == 1.0
    assert out["ratio_vs_trl"] == 6.0 and out["trl_variant"] == "t"
    assert out["ratios_pairs_per_s"] == {"a / t": 4.0, "b / t": 6.0}
    assert out["ablation"] == [{"variant": "b", "adds_to": "a", "factor": 1.5}]
    assert out["best_variant"] == "b" and out["best_ratio_vs_trl"] == 6.0


def test_each_variant_has_its_own_peak_and_ratios_compare_like_precisions():
    # "h16" computes in bfloat16 (compared with TRL's bf16 default "t16"), "h32" in float32
    # (compared with "t32"); each MFU uses the peak of the variant's precision.
    raw = {"h32": _raw([2], [1.0]), "h16": _raw([6], [1.0]), "t16": _raw([2], [1.0]), "t32": _raw([1], [1.0])}
    peaks = {"h32": 1e6, "h16": 4e6, "t16": 4e6, "t32": 1e6}
    out = summarize(raw, kinds={"h32": "jaxalign", "h16": "jaxalign", "t16": "trl", "t32": "trl"},
                    on_the_fly={n: False for n in raw}, flop_params=10, peak_flops_per_s=peaks, ladder=["h32", "h16"],
                    headline="h16", headline_float32="h32", trl_default="t16", trl_float32="t32")
    assert out["ratio_vs_trl"] == 3.0 and out["ratio_vs_trl_float32"] == 2.0
    assert out["variants"]["h16"]["mfu"] == pytest.approx(6 * 10 * 600 / 4e6)
    assert out["variants"]["h32"]["mfu"] == pytest.approx(6 * 10 * 200 / 1e6)
    assert out["variants"]["h16"]["peak_flops_per_s"] == 4e6


def test_ablation_ladder_adds_one_feature_at_a_time():
    ladder = ablation_ladder()
    assert [v.name for v in ladder] == ["jaxalign/baseline", "jaxalign/+bucketing", "jaxalign/+chunked-logps",
                                        "jaxalign/+scored-lm-head", "jaxalign/+block-attention", "jaxalign/+packing",
                                        "jaxalign/+reference-cache", "jaxalign/+bfloat16"]
    features = ("bucketing", "chunked_logps", "scored_lm_head", "block_attention", "packing", "reference", "dtype")
    base = ladder[0]
    assert tuple(getattr(base, f) for f in features) == (False, False, False, False, False, "frozen", "float32")
    last = ladder[-1]
    assert tuple(getattr(last, f) for f in features) == (True, True, True, True, True, "precomputed", "bfloat16")
    for prev, cur in zip(ladder, ladder[1:]):
        changed = [f for f in features if getattr(prev, f) != getattr(cur, f)]
        assert len(changed) == 1, (prev.name, cur.name)
    assert bucket_ladder(512) == (64, 128, 256, 512)
    assert bucket_ladder(300) == (64, 128, 256, 300)
    assert bucket_ladder(64) == (64,)


def test_markdown_lists_every_variant():
    raw = {"a": _raw([4], [2.0]), "t": _raw([2], [4.0])}
    out = summarize(raw, kinds={"a": "jaxalign", "t": "trl"}, on_the_fly={"a": True, "t": True}, flop_params=1000,
                    peak_flops_per_s={"a": 1e7, "t": 1e7}, ladder=["a"], headline="a", trl_default="t",
                    trl_float32=None)
    out.update(workload={"spec": {"hidden": 8, "layers": 1, "heads": 1, "vocab": 32}, "max_length": 64},
               flops={"flop_params": 1000}, settings={"batch": 2}, peaks_used={"float32": 1e7}, peak_source="test",
               load={"windows_mean": 0.5, "windows_max": 0.5})
    text = markdown(out)
    assert "| a | 2.00 (2.00-2.00) | 200 | 1.00 | 16.0% |" in text and "| t | 0.50" in text and "| a / t | 4.00x |" in text
