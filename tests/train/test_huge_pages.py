"""Transparent huge pages for malloc: the environment rule, the re-exec, and the CLI wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxalign.train import huge_pages
from jaxalign.train.huge_pages import TUNABLE, huge_page_environment, thp_mode

GLIBC = (2, 36)


def test_adds_the_tunable_and_keeps_the_others():
    assert huge_page_environment({"A": "1"}, glibc=GLIBC, thp="madvise") == {"GLIBC_TUNABLES": f"{TUNABLE}=1"}
    changes = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc=GLIBC, thp="always")
    assert changes == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1"}


@pytest.mark.parametrize("tunables", [f"{TUNABLE}=0", f"glibc.malloc.arena_max=2:{TUNABLE}=1"])
def test_a_tunable_already_set_is_left_alone(tunables):
    assert huge_page_environment({"GLIBC_TUNABLES": tunables}, glibc=GLIBC, thp="madvise") == {}


@pytest.mark.parametrize(("glibc", "thp"), [((2, 34), "madvise"), (GLIBC, "never"), (GLIBC, "")])
def test_nothing_where_it_cannot_help(glibc, thp):
    assert huge_page_environment({}, glibc=glibc, thp=thp) == {}


def test_nothing_with_another_c_library(monkeypatch):
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: None)
    assert huge_page_environment({}, thp="madvise") == {}


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    assert thp_mode(str(tmp_path / "missing")) == ""


CHILD = """
import json, os, sys
import numpy as np
from jaxalign.train.huge_pages import reexec_with_huge_pages
reexec_with_huge_pages()
block = np.ones(64 << 20, np.float32)  # 256 MiB through malloc, touched
huge = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "anon_huge_kib": huge}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
def test_reexec_restarts_with_the_tunable_and_malloc_gets_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    expected = huge_page_environment(env)
    proc = subprocess.run([sys.executable, "-c", CHILD, "arg1", "--flag"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["argv"] == ["arg1", "--flag"]  # same command line after the exec
    if not expected:  # this machine cannot use it: nothing changes
        assert out["tunables"] is None
    else:
        assert out["tunables"] == f"{TUNABLE}=1"
        assert out["anon_huge_kib"] >= 128 << 10  # most of the 256 MiB block is in 2 MiB pages


def test_cli_reexecs_only_from_the_entry_point_and_only_when_configured(monkeypatch, tmp_path):
    from jaxalign.train import cli, loop

    class Reexec(Exception):
        pass

    def reexec():
        raise Reexec

    def no_training(config, workdir, **_):
        raise AssertionError("train() reached")

    monkeypatch.setattr(huge_pages, "reexec_with_huge_pages", reexec)
    monkeypatch.setattr(loop, "train", no_training)
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.py")
    argv = ["jaxalign.train", "--config", recipe, "--workdir", str(tmp_path)]
    with pytest.raises(Reexec):
        cli.main(argv, reexec=True)
    with pytest.raises(AssertionError, match="train"):  # library callers: no re-exec
        cli.main(argv)
    with pytest.raises(AssertionError, match="train"):  # configured off
        cli.main([*argv, "--config.huge_pages=False"], reexec=True)
