"""JSON Lines written atomically: a killed writer never leaves a file that looks complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["read_jsonl", "write_jsonl"]


def write_jsonl(path: str, lines: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line to ``path.tmp-<pid>`` (flushed and synced), then renamed onto
    ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """The objects of a file ``write_jsonl`` wrote."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
