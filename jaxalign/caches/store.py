"""One on-disk store for every cache: named numpy arrays in a directory, written atomically
and read memory-mapped, so a cache need not fit in host memory to be used.

``ArrayStore(path).write(arrays)`` writes each array as ``NAME.npy`` into a temporary sibling
directory and renames it into place: a killed write never leaves a store that looks complete
(a half-written one is only ever a ``.tmp-*`` directory). ``read()`` opens the arrays with
``mmap_mode="r"``: pages are read from disk as they are touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

__all__ = ["ArrayStore"]


class ArrayStore:
    """Named arrays under ``path`` (a directory); see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes ``arrays`` (replacing an existing store at ``path``) atomically."""
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.path)}-", dir=parent)
        try:
            for name, value in arrays.items():
                np.save(os.path.join(tmp, f"{name}.npy"), np.asarray(value), allow_pickle=False)
            if self.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read(self) -> dict[str, np.ndarray]:
        """The stored arrays, memory-mapped read-only; ``FileNotFoundError`` if there is no store."""
        names = sorted(f[: -len(".npy")] for f in os.listdir(self.path) if f.endswith(".npy"))
        return {name: np.load(os.path.join(self.path, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
                for name in names}
