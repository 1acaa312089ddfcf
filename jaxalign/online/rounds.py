"""A round's outputs on disk: ``WORKDIR/rounds/NNNN/``, each file written atomically.

* ``samples.jsonl``: one line per prompt: ``position`` (in the prompt stream), ``prompt_index``,
  ``prompt``, ``completions`` (text), ``completion_ids``, ``finish_reasons`` (``stop`` /
  ``length``), ``logps`` (each completion's summed log-prob under the sampling policy);
* ``rewards.jsonl``: ``position``, ``rewards`` (the combined reward of each completion) and
  ``components`` (each scorer's raw values);
* ``pairs.jsonl``: one line per pair: ``position``, ``prompt``, ``chosen`` / ``rejected`` (text),
  their rewards and sample numbers;
* ``pairs/``: the same pairs tokenized (a ``jaxalign.data.store`` of ``FlatExamples``, each
  pair's index its prompt's index), from which ``online.train_on = "all_rounds"`` reads the
  earlier rounds' pairs memory-mapped;
* ``calibration.jsonl`` (online VPO): the reference's calibration sample of each prompt;
* ``reference/``: the reference log-probs of the round's sequences (an ``ArrayStore``: ``logps`` of the round's samples, then of
  the earlier rounds' pairs and of VPO's calibration sequences);
* ``timings.json``: the seconds of the phases done (a resumed round logs the time they took);
* ``summary.json``: the round's metrics, written last: a round with a summary is complete.

Round 0 holds only the summary of the evaluation before any training.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxalign.data.jsonl import read_jsonl, write_jsonl

__all__ = ["RoundFiles"]

ROUNDS_DIR = "rounds"


class RoundFiles:
    """The files of round ``index`` of the run in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: str, index: int):
        self.index = index
        self.directory = os.path.join(workdir, ROUNDS_DIR, f"{index:04d}")

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def read(self, name: str) -> list[dict[str, Any]]:
        return list(read_jsonl(self.path(name)))

    def write(self, name: str, lines: list[dict[str, Any]]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        write_jsonl(self.path(name), lines)

    def _json(self, name: str) -> dict[str, Any] | None:
        if not self.has(name):
            return None
        with open(self.path(name), encoding="utf-8") as f:
            return json.load(f)

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def summary(self) -> dict[str, Any] | None:
        """The round's metrics, or None while the round is not complete."""
        return self._json("summary.json")

    def write_summary(self, metrics: dict[str, Any]) -> None:
        self._write_json("summary.json", metrics)

    def timings(self) -> dict[str, float]:
        """The recorded seconds (and rates) of the phases done."""
        return self._json("timings.json") or {}

    def add_timings(self, values: dict[str, float]) -> None:
        self._write_json("timings.json", {**self.timings(), **values})
