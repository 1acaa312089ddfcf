"""tools/bench.py end to end on a tiny config: both trainers run, the JSON has the documented keys."""

import json
import math

import pytest

from jaxalign.bench.main import main
from jaxalign.bench.report import HEADLINE_KEYS
from jaxalign.bench.trl_side import trl_unavailable_reason

TRL_REASON = trl_unavailable_reason()
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "6016", "--batch", "2", "--max-length", "64",
        "--rounds", "1", "--steps", "2", "--warmup-steps", "0", "--peak-n", "256"]


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    variants = "jaxalign/+packing,jaxalign/+reference-cache,jaxalign/+bfloat16" + ("" if TRL_REASON else ",trl/default")
    path = root / "out.json"
    assert main([*TINY, "--variants", variants, "--workdir", str(root / "work"), "--json", str(path),
                 "--markdown", str(root / "tables.md")]) == 0
    return json.loads(path.read_text()), root


def test_json_has_the_documented_keys_and_consistent_numbers(bench_result):
    result, root = bench_result
    for key in ("tokens_per_s", "pairs_per_s", "mfu", "model_flops_per_s", "peak_rss_bytes", "compile_s"):
        assert key in result and result[key] > 0, key
    assert set(HEADLINE_KEYS) - {"ratio_vs_trl_float32"} - ({"ratio_vs_trl", "trl_variant"} if TRL_REASON else set()) \
        <= set(result)
    assert result["headline_variant"] == "jaxalign/+bfloat16"
    assert result["peaks_used"]["bfloat16"] > 0 and result["peaks_used"]["float32"] > 0
    assert result["variants"]["jaxalign/+bfloat16"]["peak_flops_per_s"] == result["peaks_used"]["bfloat16"]
    assert 0 < result["mfu"] < 1  # useful FLOPs can never exceed the measured peak
    for name, v in result["variants"].items():
        assert v["measured_steps"] == 2, name
        # Counted real tokens are a share of the computed row slots, and a pair has >= 4 tokens.
        assert 0 < v["padding_efficiency"] <= 1, name
        assert v["tokens_per_pair"] >= 4, name
        assert math.isfinite(v["last_loss"]), name
        assert v["peak_rss_bytes"] > 50 * 2**20, name
        flops_per_token = (8 if v["reference_on_the_fly"] else 6) * result["flops"]["flop_params"]
        assert v["model_flops_per_s"] == pytest.approx(flops_per_token * v["tokens_per_s"])
    cache = result["reference_cache"]
    assert cache["speedup"] == pytest.approx(cache["epoch_s_frozen"] / cache["epoch_s_precomputed"])
    assert cache["cache_build_s"] >= 0
    assert result["variants"]["jaxalign/+reference-cache"]["setup"]["built_reference_cache"]
    assert result["workload"]["num_pairs"] >= 20  # real HH-RLHF pairs from the fixture
    rows = [line.split(" | ")[0] for line in (root / "tables.md").read_text().splitlines()]
    assert {"| jaxalign/+packing", "| jaxalign/+reference-cache"} <= set(rows)


@pytest.mark.skipif(TRL_REASON is not None, reason=str(TRL_REASON))
def test_trl_ran_side_by_side(bench_result):
    result, _ = bench_result
    trl = result["variants"]["trl/default"]
    ours = result["variants"]["jaxalign/+bfloat16"]  # the same precision as TRL's default
    assert trl["kind"] == "trl" and trl["measured_steps"] == 2
    assert trl["setup"]["mixed_precision"] == "bf16"  # TRL's default on CPU with use_cpu=True
    assert result["ratio_vs_trl"] == pytest.approx(ours["pairs_per_s"] / trl["pairs_per_s"])
    assert trl["reference_on_the_fly"] and not ours["reference_on_the_fly"]


def test_bad_arguments_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--variants", "jaxalign/nope"])
    assert "--variants: unknown jaxalign/nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err
