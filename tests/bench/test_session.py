"""Bench workers: the environment a variant asks for is there from exec on (LD_PRELOAD needs that)."""

import os
import sys
from pathlib import Path

import pytest

from jaxalign.bench.session import BenchError, Worker, preload_environment


def _report_exec_environment(conn) -> None:
    """Worker factory: answers one request with JAXALIGN_PROBE as the process was exec'd with."""
    conn.recv()
    with open("/proc/self/environ", "rb") as f:
        items = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    conn.send({"value": items.get(b"JAXALIGN_PROBE", b"<absent>").decode()})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/environ")
def test_worker_environment_is_set_at_exec_and_not_left_in_the_parent(monkeypatch):
    # the spawned child unpickles the factory by module name (tests.bench.test_session)
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))
    assert "JAXALIGN_PROBE" not in os.environ
    worker = Worker("probe", _report_exec_environment, {}, env={"JAXALIGN_PROBE": "at-exec"}, timeout_s=120)
    worker.start()
    try:
        assert "JAXALIGN_PROBE" not in os.environ
        assert worker.request("value")["value"] == "at-exec"
    finally:
        worker.stop()


def test_preload_environment():
    assert preload_environment("", "w") == {}
    assert preload_environment("c", "w")["LD_PRELOAD"].startswith("libc.so")
    with pytest.raises(BenchError, match=r"w: the library libno-such-malloc\.so is not installed"):
        preload_environment("no-such-malloc", "w")
