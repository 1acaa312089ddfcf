"""Renders a run's ``metrics.jsonl`` to a PNG (matplotlib, Agg backend: no display needed).

One panel per quantity that the run logged, train and eval curves together: loss,
``rewards/accuracies``, ``rewards/margins``, ``rewards/chosen``/``rejected``, gradient norm
and learning rate.
"""

from __future__ import annotations

import os
from typing import Any

from jaxalign.train.metrics import read_metrics

__all__ = ["PANELS", "plot_metrics"]

# (title, keys); a key is plotted against the steps of the entries that have it.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval/loss")),
    ("preference accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("reward margin", ("rewards/margins", "eval/rewards/margins")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected")),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("learning_rate",)),
)


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], float(e[key])) for e in entries if key in e and isinstance(e[key], (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Writes the curves of ``RUN_DIR/metrics.jsonl`` to ``out`` (default ``RUN_DIR/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_metrics(run_dir)
    if not entries:
        raise FileNotFoundError(f"{os.path.join(os.fspath(run_dir), 'metrics.jsonl')}: no metrics to plot")
    panels = [(title, [k for k in keys if _series(entries, k)[0]]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = _series(entries, key)
            ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
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
