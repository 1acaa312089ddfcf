#!/usr/bin/env python
"""jaxalign's online DPO loop vs TRL's OnlineDPOTrainer (see jaxalign/bench/online.py and docs/performance.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from jaxalign.bench.online import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
