#!/usr/bin/env python
"""jaxalign's sampler vs transformers' generate (see jaxalign/bench/sampling.py and docs/performance.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from jaxalign.bench.sampling import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
