"""The identity of an ingested file in the ``ingests`` ledger: a tagged content digest.

A file's digest is ``"blake3:" + hex(BLAKE3-256(bytes))`` (O'Connor, Aumasson, Neves,
Wilcox-O'Hearn, *BLAKE3: one function, fast everywhere*, 2020; check one by hand with
``b3sum FILE``). BLAKE3 is a cryptographic hash, so two different files never share a
digest in practice, and a re-ingest of the same bytes is found whatever the file is
called now. It replaced SHA-256 (migration ``007_ingest_digest``) because on one core
it hashes about 2.6 times faster with AVX2/AVX-512 (``bench/ingest.py`` prints both):
next to a DuckDB load that keeps every core busy, SHA-256 cost as much as the whole of
``ingest steps``' checks and bookkeeping together.

Ledgers written before hold ``"sha256:" + hex`` digests. :func:`legacy_digest` gives a
file's one, so a file ingested then is still found (``load.find_ingest``).

The tag keeps the algorithm beside the value: a digest of one kind never equals one of
the other, and a later change of algorithm needs no new column.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import blake3

#: The prefix of the digests dpledger writes now, and of those of ledgers written before 007.
ALGORITHM, LEGACY_ALGORITHM = "blake3", "sha256"

_BLOCK = 1 << 20

#: Nice value of the thread that hashes a file while DuckDB loads it (Linux; see BackgroundDigest).
HASH_THREAD_NICE = 19


def _hash_rest(h, f) -> None:
    """Feed the rest of the open file ``f`` to the hash ``h``, a block at a time."""
    for block in iter(lambda: f.read(_BLOCK), b""):
        h.update(block)


def _new_hash():
    return blake3.blake3()  # one thread: the caller decides what runs beside it


def _tagged(algorithm: str, h) -> str:
    return f"{algorithm}:{h.hexdigest()}"


def _file_hash(path: Path | str, h, algorithm: str) -> str:
    with open(path, "rb") as f:
        _hash_rest(h, f)
    return _tagged(algorithm, h)


def file_digest(path: Path | str) -> str:
    """The file's ledger digest, ``"blake3:<64 hex digits>"``."""
    return _file_hash(path, _new_hash(), ALGORITHM)


def legacy_digest(path: Path | str) -> str:
    """The file's digest as ledgers before migration 007 recorded it, ``"sha256:<hex>"``."""
    return _file_hash(path, hashlib.sha256(), LEGACY_ALGORITHM)


class BackgroundDigest:
    """A file's :func:`file_digest`, begun on a low-priority thread and finished by :meth:`result`.

    While DuckDB loads a file its threads keep every core busy; a hash competing with them
    at equal priority only stretches the load. At the lowest priority (Linux: the thread's
    own nice value, ``HASH_THREAD_NICE``) it takes the cycles the load leaves idle, and the
    rest once the load is done, beside the commit's disk flush. :meth:`result` stops the
    thread at a block boundary and hashes what is left itself, at the caller's priority,
    so a busy machine cannot starve it. Elsewhere the thread runs at normal priority.
    """

    def __init__(self, path: Path | str):
        self._file = open(path, "rb")
        self._hash = _new_hash()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="dpledger-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if sys.platform.startswith("linux"):  # there a thread id names that thread alone
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)
            except OSError:
                pass
        try:
            while not self._stop.is_set():
                block = self._file.read(_BLOCK)
                if not block:
                    self._eof = True
                    return
                self._hash.update(block)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self) -> str:
        """The file's digest; raises what reading it raised."""
        self._halt()
        try:
            if self._error is not None:
                raise self._error
            if not self._eof:
                _hash_rest(self._hash, self._file)
                self._eof = True
            return _tagged(ALGORITHM, self._hash)
        finally:
            self._file.close()

    def close(self) -> None:
        """Stop hashing and close the file (when the result is not wanted after all)."""
        self._halt()
        self._file.close()

    def _halt(self) -> None:
        """Stop the thread at a block boundary (the hash and the file are then the caller's)."""
        self._stop.set()
        self._thread.join()


__all__ = ["ALGORITHM", "HASH_THREAD_NICE", "LEGACY_ALGORITHM", "BackgroundDigest", "file_digest", "legacy_digest"]
