"""Worker processes and their interleaved measurement windows.

Every variant (a jaxalign configuration or a TRL configuration) lives in its own process,
started with ``spawn`` so that each has its own environment from its first instruction
(threads; ``LD_PRELOAD`` for another malloc) and its own peak resident memory. The parent
drives them over a pipe with three requests: ``setup`` (build, compile, warm up),
``window n`` (run ``n`` steps and report time, pairs and tokens) and ``finish`` (report
memory, exit). While one worker runs a window the others wait on their pipes, so each has
the machine to itself; windows go round-robin (A, B, C, A, B, C, ...), so slow drifts in
machine load hit every variant alike.
"""

from __future__ import annotations

import ctypes.util
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

__all__ = ["BenchError", "Worker", "interleave", "preload_environment", "serve"]


class BenchError(RuntimeError):
    """A worker failed; the message names the worker and carries its traceback."""


def serve(bench: Any, conn) -> None:
    """Worker loop for objects with ``setup()``, ``window(n)`` and ``finish()`` methods."""
    while True:
        request = conn.recv()
        try:
            if request[0] == "setup":
                conn.send(bench.setup())
            elif request[0] == "window":
                conn.send(bench.window(int(request[1])))
            elif request[0] == "finish":
                conn.send(bench.finish())
                return
            else:
                conn.send({"error": f"unknown request {request!r}"})
        except Exception:  # reported to the parent, which raises BenchError naming the worker
            conn.send({"error": traceback.format_exc()})
            return


def preload_environment(library: str, who: str) -> dict[str, str]:
    """Worker environment that loads the shared library ``lib{library}.so`` first
    (``LD_PRELOAD``, e.g. ``tcmalloc_minimal`` for another malloc); {} for ``library == ""``.
    Raises ``BenchError`` naming ``who`` and the library when it is not installed."""
    if not library:
        return {}
    path = ctypes.util.find_library(library)
    if path is None:
        raise BenchError(f"{who}: the library lib{library}.so is not installed "
                         "(tcmalloc_minimal: apt install libtcmalloc-minimal4)")
    return {"LD_PRELOAD": path}


def _entry(factory: Callable[..., None], kwargs: dict[str, Any], conn) -> None:
    factory(conn=conn, **kwargs)


@dataclass
class Worker:
    """Parent-side handle of one worker process."""

    name: str
    factory: Callable[..., None]  # module-level function(conn=..., **kwargs) that serves requests
    kwargs: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)  # the worker's environment from exec on (LD_PRELOAD works)
    timeout_s: float = 3600.0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_entry, args=(self.factory, self.kwargs, child), name=self.name)
        with mock.patch.dict(os.environ, self.env):  # a spawned child execs with the parent's environment
            self._proc.start()
        child.close()

    def request(self, *message: Any) -> dict[str, Any]:
        self._conn.send(message)
        if not self._conn.poll(self.timeout_s):
            self.stop()
            raise BenchError(f"{self.name}: no answer to {message[0]!r} within {self.timeout_s:.0f} s")
        try:
            reply = self._conn.recv()
        except EOFError:
            raise BenchError(f"{self.name}: the worker died during {message[0]!r} "
                             f"(exit code {self._proc.exitcode}; out of memory?)") from None
        if "error" in reply:
            self.stop()
            raise BenchError(f"{self.name}: {message[0]} failed:\n{reply['error']}")
        return reply

    def stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.is_alive():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)


def interleave(workers: list[Worker], *, rounds: int, steps: int,
               log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Sets every worker up (one at a time), runs ``rounds`` rounds of one ``steps``-step window
    per worker, finishes them; returns ``{name: {"setup", "windows", "finish", "load"}}``."""
    results: dict[str, dict[str, Any]] = {}
    try:
        for w in workers:
            log(f"[bench] setting up {w.name}")
            start = time.perf_counter()
            w.start()
            setup = w.request("setup")
            setup["setup_wall_s"] = time.perf_counter() - start
            results[w.name] = {"setup": setup, "windows": [], "load": []}
            log(f"[bench]   {w.name}: ready in {setup['setup_wall_s']:.1f} s")
        for r in range(rounds):
            for w in workers:
                window = w.request("window", steps)
                window["loadavg_1m"] = os.getloadavg()[0]
                results[w.name]["windows"].append(window)
                log(f"[bench] round {r + 1}/{rounds} {w.name}: {window['pairs'] / window['seconds']:.2f} pairs/s, "
                    f"{window['tokens'] / window['seconds']:.0f} tokens/s (load {window['loadavg_1m']:.2f})")
        for w in workers:
            results[w.name]["finish"] = w.request("finish")
    finally:
        for w in workers:
            w.stop()
    return results
