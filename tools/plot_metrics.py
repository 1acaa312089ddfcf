#!/usr/bin/env python
"""Plot a jaxalign run's metrics: ``python tools/plot_metrics.py RUN_DIR [-o out.png]``.

Reads ``RUN_DIR/metrics.jsonl`` and writes a PNG of the loss, preference accuracy, reward
margins, rewards, gradient norm and learning rate (train and eval); default output
``RUN_DIR/metrics.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxalign.train.plot import plot_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("-o", "--out", default=None, help="output PNG (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_metrics(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    print(os.path.abspath(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
