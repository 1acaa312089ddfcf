"""Test-suite set-up: CPU only, 8 fake host devices for mesh tests, no network; fixtures the
trainer, online and distillation tests share (compilation cache, CLI subprocesses, recipes,
checkpoint arrays)."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(scope="session")
def _compile_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax-compilation-cache"))


@contextlib.contextmanager
def _compilation_cache_at(directory: str):
    """JAX's persistent compilation cache in ``directory`` (every program cached) while inside;
    the previous settings restored afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def compilation_cache_at():
    """``with compilation_cache_at(directory):`` see ``_compilation_cache_at`` (for session
    fixtures, set up before any module's cache fixture)."""
    return _compilation_cache_at


@pytest.fixture(scope="module")
def persistent_compilation_cache(_compile_cache_dir):
    """Reuses compiled programs across the many ``train()`` calls of a module (each builds new
    jitted steps, so JAX's in-memory cache misses; the on-disk cache hits). A conftest turns it
    on for its directory with an autouse fixture that requests it."""
    with _compilation_cache_at(_compile_cache_dir):
        yield


@pytest.fixture(scope="session")
def cli_env(_compile_cache_dir):
    """Environment for ``python -m jaxalign.train`` subprocesses: this checkout on the path, CPU,
    the tests' 8 fake devices, and the tests' persistent compilation cache (shared programs)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=_compile_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(key, None)
    return env


def write_recipe(config, path) -> str:
    """Writes a recipe file (``get_config()``) that rebuilds ``config``: for ``python -m jaxalign.train``."""
    values = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            else:
                values[f"{prefix}{key}"] = value

    walk(config)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            "from jaxalign.train.config import base_config\n\n\n"
            f"VALUES = {values!r}\n\n\n"
            "def get_config():\n"
            "    c = base_config()\n"
            "    for key, value in VALUES.items():\n"
            "        *parents, leaf = key.split('.')\n"
            "        node = c\n"
            "        for p in parents:\n"
            "            node = node[p]\n"
            "        node[leaf] = value\n"
            "    return c\n"
        )
    return path


@pytest.fixture(scope="session")
def recipe_file():
    """``recipe_file(config, path) -> path``: see ``write_recipe``."""
    return write_recipe


def _checkpoint_arrays(checkpoint_dir, step: int) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.join(os.fspath(checkpoint_dir), str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, restore_args=args)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


@pytest.fixture(scope="session")
def checkpoint_arrays():
    """``checkpoint_arrays(checkpoint_dir, step) -> {path: numpy array}``: the saved state as
    host arrays, read straight from the files (no trainer, no mesh)."""
    return _checkpoint_arrays
