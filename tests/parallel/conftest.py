"""Fixtures for the parallel tests: the toy model module and cached single-process runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).resolve().parent


def load_local(name: str) -> ModuleType:
    """Imports ``tests/parallel/<name>.py`` (tests use importlib mode: no package imports)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy() -> ModuleType:
    return load_local("toy")


@pytest.fixture(scope="session")
def toy_runs(toy):
    """``runs(mesh_config)``: the toy training result on that mesh, computed once per config.

    ``"single"`` runs on one device.
    """
    import jax

    from jaxalign import parallel

    cache: dict[str, dict] = {}

    def runs(mesh_config):
        key = repr(mesh_config)
        if key not in cache:
            if mesh_config == "single":
                mesh = parallel.make_mesh({}, devices=jax.devices()[:1])
            else:
                mesh = parallel.make_mesh(mesh_config)
            cache[key] = toy.train(mesh)
        return cache[key]

    return runs
