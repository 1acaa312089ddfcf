"""The persistent XLA compilation cache: a restart or resume loads its compiled steps.

A run compiles its train step once per batch shape it meets (packed row counts, padded
lengths), plus the eval step and the reference pass; on a large model each compile takes
tens of seconds. With JAX's persistent cache (``jax_compilation_cache_dir``) every compile
that takes at least ``jax_persistent_cache_min_compile_time_secs`` (JAX's default: 1 s) is
written to disk, and a later process that compiles the same program for the same devices
with the same JAX reads it back instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

__all__ = ["CACHE_SUBDIR", "OFF", "CompilationCacheError", "compilation_cache", "resolve_cache_dir"]

CACHE_SUBDIR = "compilation_cache"
OFF = "none"


class CompilationCacheError(ValueError):
    """The cache directory a setting names cannot be created; the message names the setting."""


def resolve_cache_dir(setting: str, workdir: str, jax_setting: str | None = None) -> str | None:
    """The directory ``compilation_cache_dir = setting`` names.

    ``"none"``: off. ``""``: JAX's own setting (``jax_setting``: ``JAX_COMPILATION_CACHE_DIR``
    or ``jax.config``) when there is one, else ``WORKDIR/compilation_cache``. Else the path.
    """
    if setting == OFF:
        return None
    if not setting:
        return jax_setting or os.path.join(os.path.abspath(workdir), CACHE_SUBDIR)
    return os.path.abspath(os.path.expanduser(setting))


def _point_at(directory: str | None) -> None:
    if directory == jax.config.jax_compilation_cache_dir:
        return
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax_cache.reset_cache()  # JAX opens the directory at the next compile


@contextlib.contextmanager
def compilation_cache(setting: str, workdir: str) -> Iterator[str | None]:
    """JAX's persistent cache in the run's directory (or off) inside the block; JAX's own setting after.

    The setting is process-wide in JAX, so it is restored on exit: code that runs after a
    run (or between runs with other directories) does not write into this run's cache.
    """
    previous = jax.config.jax_compilation_cache_dir
    directory = resolve_cache_dir(setting, workdir, previous)
    try:
        _point_at(directory)
    except OSError as e:
        raise CompilationCacheError(f"compilation_cache_dir: cannot create {directory}: {e.strerror or e}") from None
    try:
        yield directory
    finally:
        _point_at(previous)
