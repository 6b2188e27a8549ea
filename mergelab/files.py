"""Atomic file writes: every file mergelab writes (results, caches, weights, plots) goes
through a temp file in the target's folder and a rename, so a reader never sees a
half-written file, even when a run is killed mid-write or two runs share a cache."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# mkstemp creates 0600; results, caches and weights are meant to be as readable as any output.
FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block exits normally the temp file is
    renamed onto ``path``, otherwise it is removed. For writers that want a file name
    (``safetensors.torch.save_file``, ``Figure.savefig``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (text, bytes, or a function writing to a binary file) to ``path``
    atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(data, str):
            f.write(data.encode("utf-8"))
        elif isinstance(data, (bytes, bytearray)):
            f.write(data)
        else:
            data(f)
    return path
