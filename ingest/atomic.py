"""The one atomic file write of ``ingest``: a temporary name in the same folder, then a rename.

A reader (or a resumed worker) sees the old file or the whole new one, never a part:
the bytes are written under ``.<name>.<random>.tmp``, flushed to disk, and renamed
over ``path`` (``os.replace``, atomic on POSIX within one file system). Any failure
(disk full, permissions, a kill signal's exception) removes the temporary file and
re-raises; ``path`` is left as it was.

Used for lake shards and manifests (:mod:`ingest.sinks`), the resume state and the
checkpoints of a training run (:mod:`ingest.recorder`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it exists; best effort (the disk may be what is failing)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_path(path: Path | str) -> None:
    """Make the written bytes of the file at ``path`` durable (``fsync``); raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the whole file at ``tmp``; it is made durable and renamed to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)  # a failed write leaves no half-written temporary file behind
        raise


def _write_bytes(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically."""
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    """An Arrow table as the Parquet file ``path``, atomically."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_parquet", "remove_quietly"]
