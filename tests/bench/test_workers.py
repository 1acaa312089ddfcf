"""The benchmark's workers run as their trainers run (jaxalign's with malloc's huge pages), and
the commands docs/performance.md gives parse."""

from pathlib import Path

from jaxalign.bench.main import _workers, parse_args
from jaxalign.runtime import huge_pages

NAMES = ["jaxalign/+bfloat16", "jaxalign/-huge-pages", "jaxalign/+packing", "trl/default", "trl/default+huge-pages"]


def test_huge_pages_for_jaxalign_variants_and_for_trl_only_when_named(monkeypatch, tmp_path):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    args = parse_args(["--variants", ",".join(NAMES)])
    workers = {w.name: w for w in _workers(NAMES, args, {}, Path(tmp_path))}
    tunables = {name: w.env.get("GLIBC_TUNABLES") for name, w in workers.items()}
    assert tunables == {"jaxalign/+bfloat16": "glibc.malloc.hugetlb=1", "jaxalign/-huge-pages": None,
                        "jaxalign/+packing": "glibc.malloc.hugetlb=1", "trl/default": None,
                        "trl/default+huge-pages": "glibc.malloc.hugetlb=1"}
    assert workers["trl/default+huge-pages"].env["OMP_NUM_THREADS"] == workers["trl/default"].env["OMP_NUM_THREADS"]


def _documented_bench_commands() -> list[list[str]]:
    """The argument lists of every ``python tools/bench.py`` command in docs/performance.md's
    code blocks (continuation lines joined, ``$B`` and the loop variables filled in)."""
    import re
    import shlex

    text = (Path(__file__).resolve().parents[2] / "docs" / "performance.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        variables = dict(re.findall(r'^(\w+)="([^"]*)"$', text, flags=re.M))
        for line in text.splitlines():
            if "python tools/bench.py" not in line:
                continue
            line = line.split("python tools/bench.py", 1)[1].split(";")[0]
            line = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), "8"), line)
            commands.append(shlex.split(line))
    return commands


def test_the_documented_benchmark_commands_parse():
    commands = _documented_bench_commands()
    assert len(commands) >= 10
    for argv in commands:
        args = parse_args(argv)  # exits (SystemExit) on an unknown flag or variant
        assert args.variant_names, argv
