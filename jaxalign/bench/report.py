"""From the workers' raw windows to the benchmark's numbers: rates, MFU, ratios, ablation.

Per variant (windows ``w``): ``pairs_per_s = sum(pairs_w) / sum(seconds_w)`` and likewise
``tokens_per_s`` (real, non-padding tokens of chosen and rejected rows, prompts included);
``model_flops_per_s = (6 + 2 * on_the_fly_reference) * N * tokens_per_s``
(``jaxalign.perf.flops``) and ``mfu = model_flops_per_s / peak``, with ``peak`` the
variant's own: the measured JAX matmul peak on this CPU in the precision the variant
computes in (float32, or bfloat16 with float32 accumulation), the vendor's on an accelerator.
``padding_efficiency = real tokens / row slots`` (what share of the computed positions is
real). The spread over windows is reported as min / median / max pairs/s.

``mfu_scored_lm_head`` is a stricter count for DPO: the unembedding (``D * V`` of ``N``) is
charged only for the tokens the loss scores (completion tokens), since only their log-probs
are needed: ``(6 + 2 * on_the_fly) * ((N - D V) * tokens + D V * scored_tokens)``.
"""

from __future__ import annotations

import statistics
from typing import Any

from jaxalign.perf.flops import mfu, train_flops_per_token

__all__ = ["HEADLINE_KEYS", "markdown", "summarize"]

# Top-level keys of the JSON written by ``--json`` (besides the nested sections).
HEADLINE_KEYS = ("tokens_per_s", "pairs_per_s", "mfu", "model_flops_per_s", "peak_rss_bytes", "compile_s",
                 "ratio_vs_trl", "ratio_vs_trl_float32", "headline_variant", "trl_variant")


def _variant_numbers(raw: dict[str, Any], *, flop_params: int, unembedding_params: int, on_the_fly: bool,
                     peak: float) -> dict[str, Any]:
    windows = raw["windows"]
    seconds = sum(w["seconds"] for w in windows)
    pairs = sum(w["pairs"] for w in windows)
    tokens = sum(w["tokens"] for w in windows)
    slots = sum(w["row_slots"] for w in windows)
    rates = [w["pairs"] / w["seconds"] for w in windows]
    scored = sum(w["completion_tokens"] for w in windows)
    flops = train_flops_per_token(flop_params, reference_on_the_fly=on_the_fly) * tokens / seconds
    per_param = train_flops_per_token(1, reference_on_the_fly=on_the_fly)
    strict = per_param * ((flop_params - unembedding_params) * tokens + unembedding_params * scored) / seconds
    setup, finish = raw["setup"], raw.get("finish", {})
    return {
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / sum(w["steps"] for w in windows),
        "model_flops_per_s": flops,
        "mfu": mfu(flops, peak),
        "mfu_scored_lm_head": mfu(strict, peak),
        "scored_token_share": scored / tokens if tokens else None,
        "padding_efficiency": tokens / slots if slots else None,
        "tokens_per_pair": tokens / pairs if pairs else None,
        "pairs_per_s_min_median_max": [min(rates), statistics.median(rates), max(rates)],
        "measured_steps": sum(w["steps"] for w in windows),
        "measured_seconds": seconds,
        "loadavg_1m_during_windows": [w.get("loadavg_1m") for w in windows],
        "reference_on_the_fly": on_the_fly,
        "peak_rss_bytes": finish.get("peak_rss_bytes"),
        "device_peak_bytes": finish.get("device_peak_bytes"),
        "last_loss": finish.get("last_loss"),
        "compile_s": setup.get("compile_s"),
        "setup": setup,
    }


def summarize(
    raw: dict[str, dict[str, Any]],
    *,
    kinds: dict[str, str],
    on_the_fly: dict[str, bool],
    flop_params: int,
    peak_flops_per_s: dict[str, float],
    unembedding_params: int = 0,
    ladder: list[str],
    headline: str | None,
    trl_default: str | None,
    trl_float32: str | None,
    headline_float32: str | None = None,
) -> dict[str, Any]:
    """The result dict: per-variant numbers, the headline, ratios vs TRL and the ablation factors.

    ``peak_flops_per_s``: each variant's MFU denominator. ``ratio_vs_trl`` is ``headline`` over
    ``trl_default``; ``ratio_vs_trl_float32`` is ``headline_float32`` (default ``headline``)
    over ``trl_float32``, so that each compares trainers computing in the same precision."""
    variants = {
        name: {"kind": kinds[name], "peak_flops_per_s": peak_flops_per_s[name],
               **_variant_numbers(r, flop_params=flop_params, unembedding_params=unembedding_params,
                                  on_the_fly=on_the_fly[name], peak=peak_flops_per_s[name])}
        for name, r in raw.items()
    }
    out: dict[str, Any] = {"variants": variants}
    if headline is not None:
        h = variants[headline]
        out.update(headline_variant=headline, tokens_per_s=h["tokens_per_s"], pairs_per_s=h["pairs_per_s"],
                   mfu=h["mfu"], model_flops_per_s=h["model_flops_per_s"], peak_rss_bytes=h["peak_rss_bytes"],
                   compile_s=h["compile_s"])
    ratios: dict[str, float] = {}
    float32_headline = headline_float32 if headline_float32 in variants else headline
    for trl_name, key, ours in ((trl_default, "ratio_vs_trl", headline),
                                (trl_float32, "ratio_vs_trl_float32", float32_headline)):
        if ours is not None and trl_name is not None and trl_name in variants:
            out[key] = variants[ours]["pairs_per_s"] / variants[trl_name]["pairs_per_s"]
            out["trl_variant" if key == "ratio_vs_trl" else "trl_float32_variant"] = trl_name
            for name, v in variants.items():
                if v["kind"] == "jaxalign":
                    ratios[f"{name} / {trl_name}"] = v["pairs_per_s"] / variants[trl_name]["pairs_per_s"]
    out["ratios_pairs_per_s"] = ratios
    ours = [n for n, v in variants.items() if v["kind"] == "jaxalign"]
    if ours:
        best = max(ours, key=lambda n: variants[n]["pairs_per_s"])
        out.update(best_variant=best, best_pairs_per_s=variants[best]["pairs_per_s"], best_mfu=variants[best]["mfu"])
        if trl_default is not None and trl_default in variants:
            out["best_ratio_vs_trl"] = variants[best]["pairs_per_s"] / variants[trl_default]["pairs_per_s"]
    present = [n for n in ladder if n in variants]
    out["ablation"] = [
        {"variant": b, "adds_to": a, "factor": variants[b]["pairs_per_s"] / variants[a]["pairs_per_s"]}
        for a, b in zip(present, present[1:])
    ]
    return out


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/performance.md for one run."""
    w = result["workload"]
    s = w["spec"]
    lines = [
        f"model: hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, vocab {s['vocab']}, "
        f"N = {result['flops']['flop_params'] / 1e6:.1f}M (6N convention), batch {result['settings']['batch']} pairs, "
        f"max_length {w['max_length']}; peaks (MFU denominators) "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in result["peaks_used"].items())
        + f" ({result['peak_source']}); load average during windows {result['load']['windows_mean']:.2f} "
        f"(max {result['load']['windows_max']:.2f})",
        "",
        "| variant | pairs/s (min-max) | tokens/s | s/step | MFU | MFU (scored head) | padding eff. | peak RSS "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        lo, _, hi = v["pairs_per_s_min_median_max"]
        eff = v["padding_efficiency"]
        compile_s = v["compile_s"]
        lines.append(
            f"| {name} | {v['pairs_per_s']:.2f} ({lo:.2f}-{hi:.2f}) | {v['tokens_per_s']:.0f} | "
            f"{v['seconds_per_step']:.2f} | {100 * v['mfu']:.1f}% | {100 * v['mfu_scored_lm_head']:.1f}% | "
            f"{'-' if eff is None else f'{100 * eff:.0f}%'} | "
            f"{_fmt_bytes(v['peak_rss_bytes'])} | {'-' if compile_s is None else f'{compile_s:.1f}'} |"
        )
    if result.get("ratios_pairs_per_s"):
        lines += ["", "| ratio (pairs/s) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in result["ratios_pairs_per_s"].items()]
    if result.get("ablation"):
        lines += ["", "| feature added | factor (pairs/s) |", "|---|---|"]
        lines += [f"| {a['variant']} (on {a['adds_to']}) | {a['factor']:.2f}x |" for a in result["ablation"]]
    if result.get("reference_cache"):
        rc = result["reference_cache"]
        line = (f"reference cache: epoch {rc['epoch_s_frozen']:.1f} s (in-step reference) vs "
                f"{rc['epoch_s_precomputed']:.1f} s (cache): {rc['speedup']:.2f}x")
        if "cache_build_s" in rc:
            line += (f"; with the cache build ({rc['cache_build_s']:.1f} s) charged to one epoch: "
                     f"{rc['speedup_incl_cache_build']:.2f}x")
        lines += ["", line]
    return "\n".join(lines)
