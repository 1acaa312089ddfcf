"""jaxalign.host_memory: freed large blocks are reused instead of mapped and faulted in again."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# Frees a 64 MiB malloc block, then allocates and touches one of the same size: prints the
# page faults of the second allocation (fresh pages from the kernel = one fault per 4 KiB page).
_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys
    from jaxalign.host_memory import retain_freed_memory
    accepted = retain_freed_memory() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20
    first = libc.malloc(size); ctypes.memset(first, 1, size); libc.free(first)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = libc.malloc(size); ctypes.memset(second, 1, size)
    print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    accepted, faults = out.stdout.split()
    return accepted, int(faults)


@glibc_only
def test_freed_block_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    accepted, faults = _probe("retain")
    assert accepted == "True"
    assert faults < pages // 20, faults  # the freed 64 MiB is handed out again, already mapped
    _, system_faults = _probe("system")
    assert system_faults > pages // 2, system_faults  # glibc's default: mapped afresh, every page faults


@pytest.mark.parametrize("retain", [True, False])
def test_cli_retains_host_memory_unless_told_not_to(retain, monkeypatch, tmp_path, capsys):
    from jaxalign.train import cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True))
    recipe = str(Path(__file__).parents[1] / "configs" / "dpo.py")
    argv = ["jaxalign.train", "--config", recipe, "--workdir", str(tmp_path / "w"),
            f"--config.model.path={tmp_path / 'no-model'}", f"--config.data.train={tmp_path / 'no-data.jsonl'}",
            f"--config.retain_host_memory={retain}"]
    assert cli.main(argv) == cli.EXIT_USAGE  # the run itself fails: no model there
    assert "no-model" in capsys.readouterr().err
    assert calls == ([True] if retain else [])
