"""Tests for wdjax.lab.data: splits, IDX parsing, MNIST-style loaders, checksums and download."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdjax.lab import data
from wdjax.lab.data import DataError

WDJAX_SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist"

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
          np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}  # fmt: skip
IMAGES, LABELS = "images-idx3-ubyte", "labels-idx1-ubyte"


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)
    return path


def fake_split(n: int, seed: int, hw: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, hw, hw), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def write_mnist_dir(d: Path, *, train: int | None = 200, test: int = 100, gz: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    splits = {"t10k": test} | ({"train": train} if train else {})
    for prefix, n in splits.items():
        x, y = fake_split(n, seed=n)
        write_idx(d / f"{prefix}-{IMAGES}{ext}", x)
        write_idx(d / f"{prefix}-{LABELS}{ext}", y)
    return d


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_ambient_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("WDJAX_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# --- digits / xor / names -------------------------------------------------------------------


def test_digits_shapes_ranges_and_disjoint_split():
    ds = data.load("digits")
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (1258, 180, 359)
    for x, y in [(ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)]:
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape[1:] == (8, 8, 1) and len(x) == len(y)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert set(np.unique(y)) == set(range(10))
    assert ds.x_train.max() == 1.0  # scaled by /16, not /255
    # The three splits partition the 1797 images (compared as sorted multisets of rows).
    from sklearn.datasets import load_digits

    full = (load_digits().images.reshape(1797, 64) / 16).astype(np.float32)
    parts = np.concatenate([x.reshape(len(x), 64) for x in (ds.x_train, ds.x_val, ds.x_test)])
    assert sorted(r.tobytes() for r in parts) == sorted(r.tobytes() for r in full)
    assert "train 1258, val 180, test 359" in ds.summary()


def test_digits_read_directly_equal_scikit_learns_loader(monkeypatch):
    """The bundled CSV read without importing scikit-learn is `load_digits` exactly,
    images and labels; without the file, `load_digits` itself is used."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    direct = data.load("digits")
    monkeypatch.setattr(data.pathlib.Path, "is_file", lambda self: False)
    through = data.load("digits")
    for a, b in zip(direct.arrays("train").values(), through.arrays("train").values()):
        np.testing.assert_array_equal(a, b)
    table = data._digits_table()
    np.testing.assert_array_equal(table[:, :64], bunch.data)
    np.testing.assert_array_equal(table[:, 64], bunch.target)


def test_digits_split_is_stratified():
    ds = data.load("digits", val_fraction=0.25, test_fraction=0.25)
    counts = [np.bincount(y, minlength=10) for y in (ds.y_train, ds.y_val, ds.y_test)]
    total = sum(counts)
    for c, frac in zip(counts, (0.5, 0.25, 0.25), strict=True):
        assert np.abs(c - total * frac).max() <= 1  # each class in proportion, +-1 sample


def test_digits_seed_determinism():
    a, b, c = data.load("digits", seed=3), data.load("digits", seed=3), data.load("digits", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert len(a.y_train) == len(c.y_train)


def test_bad_fractions():
    with pytest.raises(DataError, match="summing to < 1"):
        data.load("digits", val_fraction=0.5, test_fraction=0.5)


def test_xor():
    ds = data.load("xor")
    assert ds.input_shape == (2,) and ds.num_classes == 2
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1, 0])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_test, ds.x_train)


def test_arrays_gives_each_split_as_x_y():
    ds = data.load("digits")
    for split in ("train", "val", "test"):
        batch = ds.arrays(split)
        assert sorted(batch) == ["x", "y"]
        assert batch["x"] is getattr(ds, f"x_{split}") and batch["y"] is getattr(ds, f"y_{split}")
    with pytest.raises(ValueError, match="split must be train, val or test, got 'valid'"):
        ds.arrays("valid")


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        DataError, match="unknown dataset 'cifar'.*digits, mnist, fashion_mnist, xor"
    ):
        data.load("cifar")


def test_data_dir_resolution(monkeypatch, tmp_path):
    assert data.data_dir() is None
    monkeypatch.setenv("WDJAX_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_dir(tmp_path / "x") == tmp_path / "x"


# --- read_idx -------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(sorted(_CODES, key=str)),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    gz=st.booleans(),
)
def test_read_idx_round_trip(tmp_path_factory, dtype, shape, gz):
    arr = (np.arange(int(np.prod(shape))) * 3 - 7).astype(dtype).reshape(shape)
    path = write_idx(tmp_path_factory.mktemp("idx") / ("a.gz" if gz else "a"), arr)
    out = data.read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


BAD_IDX = {
    "empty": (b"", r"bad IDX magic \(empty\)"),
    "nonzero-magic": (
        b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc",
        "bad IDX magic 01000801",
    ),
    "bad-type-code": (
        b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc",
        "bad IDX magic 00000701",
    ),
    "zero-dims": (b"\x00\x00\x08\x00", "bad IDX magic 00000800"),
    "short-header": (b"\x00\x00\x08\x03\x00\x00", r"truncated IDX header \(6 bytes, expected 16\)"),
    "truncated-data": (
        idx_bytes(np.zeros((4, 3), np.uint8))[:-2],
        "truncated IDX file: header says 4x3 uint8 = 12 data bytes, found 10",
    ),
    "trailing-bytes": (
        idx_bytes(np.zeros(5, np.int32)) + b"\0",
        "trailing bytes in IDX file: .* 20 data bytes, found 21",
    ),
    "truncated-gzip": (
        gzip.compress(idx_bytes(np.zeros(100, np.uint8)), mtime=0)[:-12],
        "corrupt or truncated gzip data",
    ),
    "not-gzip": (b"\x1f\x8bnot really gzip", "corrupt or truncated gzip data"),
}


@pytest.mark.parametrize(("content", "message"), BAD_IDX.values(), ids=BAD_IDX.keys())
def test_read_idx_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        data.read_idx(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="expected a readable IDX file"):
        data.read_idx(tmp_path / "nope")


# --- mnist / fashion_mnist from local files -------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_train_and_t10k(tmp_path, gz):
    write_mnist_dir(tmp_path, train=200, test=100, gz=gz)
    ds = data.load("mnist", data_dir=tmp_path, val_fraction=0.1)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (180, 20, 100)
    assert ds.input_shape == (4, 4, 1) and ds.num_classes == 10
    x_test, y_test = fake_split(100, seed=100)
    np.testing.assert_allclose(ds.x_test[..., 0], x_test / 255, rtol=1e-6)  # t10k kept in order
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.verified == () and "(t10k only" not in ds.source


def test_mnist_t10k_only_is_split_three_ways(tmp_path):
    write_mnist_dir(tmp_path / "mnist", train=None, test=200)
    ds = data.load("mnist", data_dir=tmp_path, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (140, 20, 40)
    assert all(np.bincount(y, minlength=10).min() > 0 for y in (ds.y_val, ds.y_test))
    assert "t10k only" in ds.source
    again = data.load("mnist", data_dir=tmp_path, seed=1)
    np.testing.assert_array_equal(ds.x_val, again.x_val)


def test_fashion_prefers_its_subdirectory(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path, train=None, test=50)
    write_mnist_dir(tmp_path / "fashion_mnist", train=None, test=100)
    monkeypatch.setenv("WDJAX_DATA", str(tmp_path))
    ds = data.load("fashion_mnist")
    assert ds.name == "fashion_mnist" and sum(map(len, (ds.y_train, ds.y_val, ds.y_test))) == 100


def test_mnist_npz(tmp_path):
    (x_tr, y_tr), (x_te, y_te) = fake_split(100, seed=0, hw=28), fake_split(30, seed=1, hw=28)
    np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    ds = data.load("mnist", data_dir=tmp_path)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (90, 10, 30)
    assert ds.input_shape == (28, 28, 1) and "npz" in ds.source


def test_npz_missing_key(tmp_path):
    x, y = fake_split(10, seed=0)
    np.savez(tmp_path / "fashion_mnist.npz", x_train=x, y_train=y, x_test=x)
    with pytest.raises(DataError, match="expected keys .* missing"):
        data.load("fashion_mnist", data_dir=tmp_path)


def test_missing_directory_message(tmp_path):
    d = tmp_path / "x" / "y"
    with pytest.raises(DataError) as e:
        data.load("mnist", data_dir=d)
    msg = str(e.value)
    assert msg == (
        f"mnist: expected t10k-images-idx3-ubyte(.gz) or mnist.npz in {d} or {d / 'mnist'} "
        "(set --data-dir or WDJAX_DATA, or pass download=True)"
    )


def test_missing_labels_file(tmp_path):
    write_mnist_dir(tmp_path, train=None)
    (tmp_path / f"t10k-{LABELS}.gz").unlink()
    with pytest.raises(
        DataError, match=re.escape(f"mnist: expected t10k-{LABELS}(.gz) in {tmp_path}")
    ):
        data.load("mnist", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((5, 4, 4), np.uint8), np.arange(6, dtype=np.uint8), "5 images but 6 labels"),
        (
            np.zeros((5, 4, 4), np.uint8),
            np.array([0, 1, 2, 3, 10], np.uint8),
            "labels in 0..9 .* got 0..10",
        ),
        (
            np.zeros((5, 16), np.uint8),
            np.arange(5, dtype=np.uint8),
            r"expected \(N, H, W\) uint8 images",
        ),
        (
            np.zeros((5, 4, 4), np.float32),
            np.arange(5, dtype=np.uint8),
            r"expected \(N, H, W\) uint8 images",
        ),
        (
            np.zeros((5, 4, 4), np.uint8),
            np.zeros((5, 1), np.uint8),
            r"expected \(N,\) integer labels",
        ),
    ],
)
def test_malformed_arrays(tmp_path, images, labels, message):
    write_idx(tmp_path / f"t10k-{IMAGES}", images)
    write_idx(tmp_path / f"t10k-{LABELS}", labels)
    with pytest.raises(DataError, match=message):
        data.load("mnist", data_dir=tmp_path)


def test_md5sums_verified_and_mismatch(tmp_path):
    write_mnist_dir(tmp_path, train=None)
    images, labels = tmp_path / f"t10k-{IMAGES}.gz", tmp_path / f"t10k-{LABELS}.gz"
    sums = tmp_path / "MD5SUMS"
    sums.write_text(
        f"{md5(images)}  {images.name}\n{md5(labels)} *{labels.name}\n{'0' * 32}  other\n"
    )
    assert data.load("mnist", data_dir=tmp_path).verified == (images.name, labels.name)
    sums.write_text(f"{md5(images)}  {images.name}\n{'0' * 32}  {labels.name}\n")
    with pytest.raises(DataError, match=re.escape(f"md5 mismatch for {labels}: MD5SUMS says 0000")):
        data.load("mnist", data_dir=tmp_path)
    sums.write_text("garbage\n")
    with pytest.raises(DataError, match="MD5SUMS line 1: expected '<md5>  <filename>'"):
        data.load("mnist", data_dir=tmp_path)


@pytest.mark.skipif(
    not WDJAX_SHARED_MNIST.is_dir(),
    reason=f"shared MNIST test data not found at {WDJAX_SHARED_MNIST}",
)
def test_shared_mnist_t10k():
    ds = data.load("mnist", data_dir=WDJAX_SHARED_MNIST)
    assert ds.verified == ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    assert sum(map(len, (ds.y_train, ds.y_val, ds.y_test))) == 10_000
    assert ds.input_shape == (28, 28, 1)
    y = np.concatenate([ds.y_train, ds.y_val, ds.y_test])
    assert set(np.unique(y)) == set(range(10))
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
    # The shared files are the official t10k files.
    for f, want in data.MD5["mnist"].items():
        if f.startswith("t10k"):
            assert md5(WDJAX_SHARED_MNIST / f) == want


# --- download -------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A loopback HTTP server over a directory of synthetic MNIST files; MD5 table patched."""
    root = write_mnist_dir(tmp_path / "served", train=60, test=40)
    for f in root.iterdir():
        monkeypatch.setitem(data.MD5["mnist"], f.name, md5(f))
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_and_load(served, tmp_path):
    url, requests = served
    dest = data.download("mnist", tmp_path / "dl", base_url=url)
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.MD5["mnist"])
    assert len(requests) == 4
    data.download("mnist", dest, base_url=url + "/")  # all present and valid: nothing fetched
    assert len(requests) == 4
    ds = data.load("mnist", data_dir=dest)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (54, 6, 40)


def test_load_with_download_flag(served, tmp_path, monkeypatch):
    url, requests = served
    monkeypatch.setitem(data.BASE_URLS, "mnist", url)
    ds = data.load("mnist", download=True)  # no dir: ~/.cache/wdjax (HOME is patched)
    assert len(requests) == 4 and len(ds.y_test) == 40
    assert (tmp_path / "home/.cache/wdjax/mnist" / f"t10k-{IMAGES}.gz").is_file()
    assert len(data.load("mnist").y_test) == 40  # found again in the cache without download


def test_download_checksum_mismatch_removes_file(served, tmp_path, monkeypatch):
    url, _ = served
    bad = f"train-{LABELS}.gz"
    monkeypatch.setitem(data.MD5["mnist"], bad, "0" * 32)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / bad).write_bytes(b"stale")
    with pytest.raises(
        DataError, match=re.escape(f"mnist: checksum mismatch for {bad} from {url}/{bad}")
    ):
        data.download("mnist", dest, base_url=url)
    assert not (dest / bad).exists()
    assert [p.name for p in dest.iterdir()] == [f"train-{IMAGES}.gz"]  # no .part left behind


def test_download_http_error(served, tmp_path):
    url, _ = served
    with pytest.raises(DataError, match="could not download .*/nowhere/t.*404"):
        data.download("mnist", tmp_path / "dl", base_url=url + "/nowhere")
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_unknown_name(tmp_path):
    with pytest.raises(DataError, match="download: unknown dataset 'digits'"):
        data.download("digits", tmp_path)
