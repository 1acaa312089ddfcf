"""Renders a run's ``metrics.jsonl`` to a PNG (matplotlib, Agg backend: no display needed).

One panel per quantity that the run logged, train and eval curves together: loss,
``rewards/accuracies``, ``rewards/margins``, ``rewards/chosen``/``rejected``, gradient norm
and learning rate; for an online run (rows with ``round``) the per-round curves against the
round: rewards (the round's samples and held-out ``eval/reward_mean``), KL, stop rate and
the time per phase.
"""

from __future__ import annotations

import os
from typing import Any

from jaxalign.train.metrics import read_metrics

__all__ = ["PANELS", "plot_metrics"]

# (title, x, keys); a key is plotted against x ("step" or "round") of the entries that have both.
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "step", ("loss", "eval/loss")),
    ("preference accuracy", "step", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("reward margin", "step", ("rewards/margins", "eval/rewards/margins")),
    ("rewards", "step", ("rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected")),
    ("gradient norm", "step", ("grad_norm",)),
    ("learning rate", "step", ("learning_rate",)),
    ("reward per round", "round", ("online/reward_mean", "online/reward_best_of_k", "eval/reward_mean")),
    ("KL(policy, reference) per round", "round", ("online/kl",)),
    ("stop rate per round", "round", ("online/stop_rate", "eval/stop_rate")),
    ("seconds per round", "round", ("time/generate_s", "time/score_s", "time/reference_s", "time/train_s")),
)


def _series(entries: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[int], list[float]]:
    points = [(e[x], float(e[key])) for e in entries
              if key in e and x in e and isinstance(e[key], (int, float)) and (x == "round" or "round" not in e)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Writes the curves of ``RUN_DIR/metrics.jsonl`` to ``out`` (default ``RUN_DIR/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_metrics(run_dir)
    if not entries:
        raise FileNotFoundError(f"{os.path.join(os.fspath(run_dir), 'metrics.jsonl')}: no metrics to plot")
    panels = [(title, x, [k for k in keys if _series(entries, k, x)[0]]) for title, x, keys in PANELS]
    panels = [(title, x, keys) for title, x, keys in panels if keys]
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, x, keys) in zip(axes.flat, panels):
        for key in keys:
            xs, values = _series(entries, key, x)
            ax.plot(xs, values, marker="o" if key.startswith("eval/") or x == "round" else None, markersize=3,
                    label=key)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.abspath(os.fspath(run_dir))))
    fig.tight_layout()
    out = os.fspath(out) if out is not None else os.path.join(os.fspath(run_dir), "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
