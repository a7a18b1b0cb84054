"""Import of Feldman-Zhang memorization scores (``dpledger ingest memorization FILE.npz``).

The published files (Feldman & Zhang, NeurIPS 2020) hold ``tr_mem`` (memorization
score per training example), ``tr_labels`` and optionally ``tt_labels`` and
influence arrays. Their order is the file's own: position i is point i of the
dataset's training split *as the file's authors indexed it*, which matches
dpledger's point ids only when both use the dataset's original training order. Give
``index`` (a .npy or one-id-per-line text file: the dpledger point id of each
position) when they differ. Where ``points`` holds labels for the dataset, every
label is checked, so a shuffled order is caught rather than silently joined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dpledger.models.datasets import DatasetError, npz_arrays
from dpledger.warehouse.errors import UserError

from . import load
from .digest import file_digest
from .readers import MAX_INDEX

KIND = "memorization"
#: Largest array read from the file (tr_mem, tr_labels), checked from the zip directory and
#: the array's header before it is read: 256 MiB, 32 million float64 scores.
MAX_ARRAY_BYTES = 256 << 20


def _index(path: Path, n: int) -> np.ndarray:
    if not path.exists():
        raise UserError(f"{path}: no such index file")
    try:
        ids = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not an index file of integer point ids ({str(exc).splitlines()[0]})") from None
    ids = np.asarray(ids).ravel()
    if ids.shape[0] != n:
        raise UserError(f"{path}: {ids.shape[0]} ids for {n} scores")
    if not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any() or (ids > MAX_INDEX).any():
        raise UserError(f"{path}: point ids must be integers in [0, {MAX_INDEX}]")
    if len(np.unique(ids)) != n:
        raise UserError(f"{path}: a point id appears twice")
    return ids.astype(np.int64)


def ingest_memorization(con, path: str | Path, dataset: str, index: str | Path | None = None,
                        source: str | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        arrays = npz_arrays(path, ("tr_mem", "tr_labels"), MAX_ARRAY_BYTES)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    if "tr_mem" not in arrays:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
        raise UserError(f"{path}: no array 'tr_mem' (the file has: {', '.join(keys) or 'nothing'})")
    raw = arrays["tr_mem"]
    if raw.dtype.kind not in "iuf":  # complex, bool, strings, dates: not a score
        raise UserError(f"{path}: tr_mem holds {raw.dtype} values; expected real numbers")
    mem = np.asarray(raw, dtype=np.float64).ravel()
    labels = arrays.get("tr_labels")
    if labels is not None:
        labels = labels.ravel()
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)) \
                and np.all(np.abs(labels) < 2.0**53):
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iu":
            raise UserError(f"{path}: tr_labels holds {labels.dtype} values; expected integer class labels")
    bad = np.flatnonzero(~np.isfinite(mem))
    if bad.size:
        raise UserError(f"{path}: tr_mem[{bad[0]}] is {mem[bad[0]]}")
    if labels is not None and labels.shape[0] != mem.shape[0]:
        raise UserError(f"{path}: tr_labels has {labels.shape[0]} entries but tr_mem {mem.shape[0]}")
    ids = _index(Path(index), len(mem)) if index is not None else np.arange(len(mem), dtype=np.int64)
    source = source or path.stem
    digest = file_digest(path)
    with load.write_transaction(con):
        seen = load.find_ingest(con, digest, KIND, f"{dataset}:{source}", path)
        if seen is not None:
            return {"path": str(path), "status": "skipped", "reason": f"already ingested on {seen['ingested_at']}",
                    "rows": 0, "dataset": dataset}
        if labels is not None:
            known = con.sql("SELECT point_id, label FROM points WHERE dataset = $ds AND label IS NOT NULL",
                            params={"ds": dataset}).fetchnumpy()
            if len(known["point_id"]):
                lookup = dict(zip(known["point_id"].tolist(), known["label"].tolist()))
                for pos, (pid, lab) in enumerate(zip(ids.tolist(), labels.tolist())):
                    if pid in lookup and lookup[pid] != lab:
                        raise UserError(f"{path}: position {pos} (point {pid}) has label {lab} but dataset "
                                        f"'{dataset}' has {lookup[pid]}: the file's order differs from the "
                                        "dataset's; give index", "index")
        con.execute("DELETE FROM memorization WHERE dataset = ? AND source = ?", [dataset, source])
        rows = pa.table({"dataset": pa.array([dataset] * len(ids), pa.string()), "point_id": ids,
                         "score": mem, "source": pa.array([source] * len(ids), pa.string())})
        load.append_rows(con, "memorization", rows)
        load.record_ingest(con, digest, KIND, f"{dataset}:{source}", str(path), len(ids), [])
    return {"path": str(path), "status": "ingested", "rows": int(len(ids)), "dataset": dataset, "source": source}
