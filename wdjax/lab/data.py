"""Small image-classification datasets as NumPy arrays: digits, MNIST, Fashion-MNIST, XOR.

Every problem with the data (missing files, bad checksums, corrupt IDX files, wrong shapes)
raises [`DataError`][wdjax.lab.data.DataError] with a one-line message saying what was
expected where.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "xor")

BASE_URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_HINT = "set --data-dir or WDJAX_DATA, or pass download=True"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset is missing, corrupt or malformed; the message says what was expected where."""


@dataclass(frozen=True)
class Dataset:
    """Train/val/test splits: `x` float32 in [0, 1] (NHWC for images), `y` int32 labels.

    `source` says where the arrays came from; `verified` names the files whose checksums
    were checked while loading.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str = ""
    verified: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """`{"x", "y"}` of `split` (`"train"`, `"val"` or `"test"`)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        return {"x": getattr(self, f"x_{split}"), "y": getattr(self, f"y_{split}")}

    def summary(self) -> str:
        return (
            f"{self.name}: train {len(self.y_train)}, val {len(self.y_val)}, "
            f"test {len(self.y_test)}, input {self.input_shape}, {self.num_classes} classes"
        )


def data_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The data directory: `explicit` if given, else `$WDJAX_DATA` if set, else None."""
    if explicit is not None:
        return pathlib.Path(explicit).expanduser()
    env = os.environ.get("WDJAX_DATA")
    return pathlib.Path(env).expanduser() if env else None


_data_dir = data_dir  # `load` has a parameter of the same name


def _cache_dir() -> pathlib.Path:
    return pathlib.Path.home() / ".cache" / "wdjax"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-endian array, validating it."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: expected a readable IDX file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path}: bad IDX magic {raw[:4].hex() or '(empty)'} (expected 0000 + type code "
            f"{'/'.join(f'{c:02x}' for c in _IDX_DTYPES)} + dimension count >= 1)"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    want = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got != want:
        dims = "x".join(map(str, shape))
        what = "truncated" if got < want else "trailing bytes in"
        raise DataError(
            f"{path}: {what} IDX file: header says {dims} {dtype.name} = {want} data bytes, "
            f"found {got}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _md5(path: pathlib.Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_md5sums(
    name: str, directory: pathlib.Path, files: list[pathlib.Path]
) -> tuple[str, ...]:
    """Verify `files` listed in `directory/MD5SUMS` (`<md5>  <filename>` lines)."""
    sums_file = directory / "MD5SUMS"
    if not sums_file.is_file():
        return ()
    sums = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 32:
            raise DataError(
                f"{name}: {sums_file} line {n}: expected '<md5>  <filename>', got {line!r}"
            )
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    verified = []
    for f in files:
        if f.name in sums:
            if (got := _md5(f)) != sums[f.name]:
                raise DataError(
                    f"{name}: md5 mismatch for {f}: MD5SUMS says {sums[f.name]}, file is {got}"
                )
            verified.append(f.name)
    return tuple(verified)


def _split(
    y: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified (train, val, test) indices; val/test get round(N * fraction) each.

    Each class is spread evenly over a random ranking of all samples, so every split gets each
    class in proportion (to within one sample).
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise DataError(
            f"expected val_fraction, test_fraction >= 0 summing to < 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    key = np.empty(len(y))
    for c in np.unique(y):
        members = perm[y[perm] == c]
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    ranked = perm[np.argsort(key[perm], kind="stable")]
    n_test, n_val = round(len(y) * test_fraction), round(len(y) * val_fraction)
    test, val, train = ranked[:n_test], ranked[n_test : n_test + n_val], ranked[n_test + n_val :]
    return rng.permutation(train), rng.permutation(val), rng.permutation(test)


def _images(
    name: str, images: np.ndarray, labels: np.ndarray, where: object
) -> tuple[np.ndarray, np.ndarray]:
    """Check (N, H, W) uint8 images and (N,) labels; return NHWC float32 in [0, 1] and int32."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{name}: expected (N, H, W) uint8 images in {where}, got {images.shape} {images.dtype}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{name}: expected (N,) integer labels in {where}, got {labels.shape} {labels.dtype}"
        )
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels in {where}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(
            f"{name}: expected labels in 0..9 in {where}, got {labels.min()}..{labels.max()}"
        )
    return images[..., None].astype(np.float32) / 255, labels.astype(np.int32)


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    return next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)


def _candidates(name: str, base: pathlib.Path) -> list[pathlib.Path]:
    return [base, base / "mnist"] if name == "mnist" else [base / name, base]


def _find(name: str, base: pathlib.Path) -> pathlib.Path | None:
    """The first candidate directory holding t10k IDX files or `<name>.npz`."""
    for d in _candidates(name, base):
        if _idx_file(d, "t10k-images-idx3-ubyte") or (d / f"{name}.npz").is_file():
            return d
    return None


def _load_mnist_like(
    name: str, base: pathlib.Path, seed: int, val_fraction: float, test_fraction: float
) -> Dataset:
    if (d := _find(name, base)) is None:
        where = " or ".join(map(str, _candidates(name, base)))
        raise DataError(
            f"{name}: expected t10k-images-idx3-ubyte(.gz) or {name}.npz in {where} ({_HINT})"
        )
    if _idx_file(d, "t10k-images-idx3-ubyte"):
        stems = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        if _idx_file(d, "train-images-idx3-ubyte") or _idx_file(d, "train-labels-idx1-ubyte"):
            stems += ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
        files = []
        for stem in stems:
            if (f := _idx_file(d, stem)) is None:
                raise DataError(f"{name}: expected {stem}(.gz) in {d} ({_HINT})")
            files.append(f)
        verified = _check_md5sums(name, d, files)
        arrays = [read_idx(f) for f in files]
        pairs = [(arrays[i], arrays[i + 1], files[i]) for i in range(0, len(files), 2)]
        kind = "IDX"
    else:
        f = d / f"{name}.npz"
        verified = _check_md5sums(name, d, [f])
        try:
            with np.load(f, allow_pickle=False) as z:
                pairs = [(z[f"x_{s}"], z[f"y_{s}"], f) for s in ("test", "train")]
        except KeyError as e:
            raise DataError(
                f"{name}: expected keys x_train, y_train, x_test, y_test in {f}, missing {e}"
            ) from None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"{name}: {f} is not a readable .npz file ({e})") from None
        kind = "npz"
    x, y = _images(name, *pairs[0])
    if len(pairs) == 1:  # t10k only: split it three ways
        tr, va, te = _split(y, seed, val_fraction, test_fraction)
        src = f"{kind} in {d} (t10k only, split into train/val/test)"
        return Dataset(name, x[tr], y[tr], x[va], y[va], x[te], y[te], 10, src, verified)
    x_test, y_test = x, y
    x, y = _images(name, *pairs[1])
    tr, va, _ = _split(y, seed, val_fraction, 0.0)
    src = f"{kind} in {d}"
    return Dataset(name, x[tr], y[tr], x[va], y[va], x_test, y_test, 10, src, verified)


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled `digits.csv.gz` (64 pixels and the label a row), read
    without importing scikit-learn (1.5 s of SciPy imports on a 2-core CPU); through
    `load_digits` where the file is not where it has always been."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("digits: needs scikit-learn (pip install wdjax[data])")
    path = pathlib.Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if path.is_file():
        return np.loadtxt(path, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.concatenate([bunch.data, bunch.target[:, None]], axis=1)


def _load_digits(seed: int, val_fraction: float, test_fraction: float) -> Dataset:
    table = _digits_table()
    x = (table[:, :64].reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
    y = table[:, 64].astype(np.int32)
    tr, va, te = _split(y, seed, val_fraction, test_fraction)
    return Dataset(
        "digits", x[tr], y[tr], x[va], y[va], x[te], y[te], 10, "scikit-learn load_digits"
    )


def _load_xor() -> Dataset:
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    return Dataset("xor", x, y, x, y, x, y, 2, "the 4 XOR points (train = val = test)")


def download(
    name: str, dest_dir: str | os.PathLike, *, base_url: str | None = None
) -> pathlib.Path:
    """Fetch the four IDX .gz files of `name` into `dest_dir`; return `dest_dir` as a Path.

    Each file is md5-checked against [`MD5`][wdjax.lab.data.MD5] and moved into place
    only when it matches; files already there with the right checksum are kept. On a
    mismatch the bad file is removed and DataError raised.
    """
    if name not in MD5:
        raise DataError(f"download: unknown dataset {name!r}; expected one of {', '.join(MD5)}")
    dest = pathlib.Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    url_base = (base_url or BASE_URLS[name]).rstrip("/") + "/"
    for fname, want in MD5[name].items():
        target = dest / fname
        if target.is_file() and _md5(target) == want:
            continue
        url = url_base + fname
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=dest)
        tmp = pathlib.Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                h = hashlib.md5(usedforsecurity=False)
                for block in iter(lambda: resp.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != want:
                target.unlink(missing_ok=True)
                raise DataError(
                    f"{name}: checksum mismatch for {fname} from {url}: md5 {h.hexdigest()}, "
                    f"expected {want} (download removed)"
                )
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"{name}: could not download {url} into {dest} ({e})") from None
        finally:
            tmp.unlink(missing_ok=True)
    return dest


_download = download  # `load` has a parameter of the same name


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    download: bool = False,
) -> Dataset:
    """Load a dataset from [`DATASETS`][wdjax.lab.data.DATASETS].

    - `digits`: scikit-learn's 8x8 digits (x / 16), stratified train/val/test split by `seed`.
    - `mnist`, `fashion_mnist` (x / 255): IDX files (`train-*`/`t10k-*`, raw or .gz) or a
      Keras-style `<name>.npz`, looked for in `DIR` then `DIR/mnist` for mnist, and in
      `DIR/fashion_mnist` then `DIR` for fashion_mnist. `DIR` is `data_dir`, else
      `$WDJAX_DATA`, else `~/.cache/wdjax`. The official train set is split into train/val
      (`val_fraction`; `test_fraction` unused) and t10k is the test set; if only the
      t10k files exist, those 10k images are split into train/val/test by the fractions
      (stratified, seeded). A directory's `MD5SUMS` file is checked for the files read.
      With `download=True` and nothing found, the files are downloaded into
      `DIR/<name>` first.
    - `xor`: the 4 XOR points, x of shape (4, 2), used as train, val and test.
    """
    if name == "digits":
        return _load_digits(seed, val_fraction, test_fraction)
    if name == "xor":
        return _load_xor()
    if name not in BASE_URLS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    base = _data_dir(data_dir) or _cache_dir()
    if download and _find(name, base) is None:
        _download(name, base / name)
    return _load_mnist_like(name, base, seed, val_fraction, test_fraction)
