"""The benchmark's workers run as their trainers run: jaxalign's with malloc's huge pages."""

from pathlib import Path

from jaxalign.bench.main import _workers, parse_args
from jaxalign.train import huge_pages

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
