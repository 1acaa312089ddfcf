#!/usr/bin/env python
"""Tokenized-data cache benchmark (see jaxalign/bench/data_cache.py and docs/performance.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from jaxalign.bench.data_cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
