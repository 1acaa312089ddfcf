"""Transparent huge pages for malloc: the CPU-host rule, the environment rule, the re-exec, and
the CLI wiring (including --help)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxalign.runtime import huge_pages
from jaxalign.runtime.huge_pages import TUNABLE, cpu_host, huge_page_environment, restart_environment, thp_mode

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


def _dev(tmp_path, *names):
    """A fake /dev holding the named (empty) device files."""
    root = tmp_path / "dev"
    root.mkdir(parents=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return str(root)


@pytest.mark.parametrize(("platforms", "cpu"), [
    ("cpu", True), (" CPU ", True), ("cpu,cpu", True),
    ("cuda", False), ("gpu", False), ("tpu", False), ("rocm", False), ("cuda,cpu", False), ("cpu,tpu", False),
])
def test_jax_platforms_decides_whatever_the_devices(tmp_path, platforms, cpu):
    dev = _dev(tmp_path, "nvidia0", "nvidiactl")
    assert cpu_host({"JAX_PLATFORMS": platforms}, dev) is cpu
    assert cpu_host({"JAX_PLATFORMS": platforms}, _dev(tmp_path / "empty")) is cpu


@pytest.mark.parametrize(("files", "cpu"), [
    ((), True),
    (("null", "zero", "tty0", "vfio/vfio", "dri/card0", "nvme0", "accelerometer"), True),  # no JAX device
    (("nvidia0",), False), (("nvidia3",), False), (("nvidiactl",), False), (("dxg",), False),
    (("kfd",), False), (("accel0",), False), (("vfio/vfio", "vfio/0"), False), (("neuron0",), False),
])
def test_without_jax_platforms_accelerator_device_files_decide(tmp_path, files, cpu):
    dev = _dev(tmp_path, *files)
    assert cpu_host({}, dev) is cpu
    assert cpu_host({"JAX_PLATFORMS": ""}, dev) is cpu  # empty = unset
    assert cpu_host({}, str(tmp_path / "no-such-dev")) is True


def test_no_restart_on_an_accelerator_host(tmp_path):
    gpu, cpu = _dev(tmp_path, "nvidia0"), _dev(tmp_path / "cpu", "null")
    assert restart_environment({}, dev=gpu, glibc=GLIBC, thp="madvise") == {}
    assert restart_environment({"JAX_PLATFORMS": "cuda"}, dev=cpu, glibc=GLIBC, thp="madvise") == {}
    # JAX forced onto the CPU of a GPU host: XLA:CPU's buffers again, so the restart.
    assert restart_environment({"JAX_PLATFORMS": "cpu"}, dev=gpu, glibc=GLIBC, thp="madvise") == {
        "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    assert restart_environment({}, dev=cpu, glibc=GLIBC, thp="madvise") == {"GLIBC_TUNABLES": f"{TUNABLE}=1"}
    assert restart_environment({}, dev=cpu, glibc=(2, 34), thp="madvise") == {}
    assert restart_environment({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, dev=cpu, glibc=GLIBC, thp="madvise") == {}


def test_reexec_does_nothing_on_an_accelerator_host(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: GLIBC)
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted on a GPU host"))
    huge_pages.reexec_with_huge_pages()  # returns


CHILD = """
import json, os, sys
import numpy as np
from jaxalign.runtime.huge_pages import reexec_with_huge_pages
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
    env["JAX_PLATFORMS"] = "cpu"  # a CPU host, whatever this machine has
    expected = restart_environment(env)
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


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_says_when_the_trainer_restarts_and_how_to_turn_it_off(flag, capsys):
    from jaxalign.train import cli

    assert cli.main(["jaxalign.train", flag]) == cli.EXIT_OK
    assert cli.main(["jaxalign.train", "--config", "configs/quickstart.py", flag]) == cli.EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: python -m jaxalign.train" in text
    assert "restarts itself once" in text and "CPU host" in text and "glibc.malloc.hugetlb=1" in text
    assert "--config.huge_pages=False" in text
