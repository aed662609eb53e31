"""Tasks where regularization matters: seeded, documented variants of a dataset.

On the clean digits λ barely matters (every λ of a cross-validated sweep is within
noise). Two standard ways to make it matter, and a regression task for L1:

* [`label_noise`][wdjax.lab.variants.label_noise]: a fraction of the *training* labels
  replaced by a uniformly drawn other class (validation and test stay clean), so a
  model that fits the training set memorizes noise;
* [`subsample`][wdjax.lab.variants.subsample]: a stratified fraction of the training
  set (validation and test unchanged);
* [`sparse_regression`][wdjax.lab.variants.sparse_regression]: `y = X·w* + ε` with `k`
  nonzero coefficients among `d`, fewer examples than features.

Each is a pure function of its arguments and seed, and names what it did
(`digits+noise0.3`), so the examples, tests and benchmarks share exactly the same tasks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from wdjax.lab.data import Dataset


def label_noise(ds: Dataset, rate: float, seed: int = 0) -> Dataset:
    """`ds` with `round(rate·n)` training labels, chosen at random, each replaced by one
    of the *other* classes drawn uniformly (so exactly that many labels are wrong)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    y = ds.y_train.copy()
    flip = rng.choice(len(y), round(rate * len(y)), replace=False)
    y[flip] = (y[flip] + rng.integers(1, ds.num_classes, len(flip))) % ds.num_classes
    return dataclasses.replace(
        ds,
        name=f"{ds.name}+noise{rate:g}",
        y_train=y.astype(ds.y_train.dtype),
        source=f"{ds.source}; {len(flip)} training labels replaced (seed {seed})",
    )


def subsample(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """`ds` with a stratified `fraction` of its training set (at least one example of
    each class present); validation and test unchanged."""
    if not 0 < fraction <= 1:
        raise ValueError(f"training fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(ds.y_train):
        rows = np.flatnonzero(ds.y_train == c)
        keep.append(rng.choice(rows, max(1, round(fraction * len(rows))), replace=False))
    rows = np.sort(np.concatenate(keep))
    return dataclasses.replace(
        ds,
        name=f"{ds.name}+frac{fraction:g}",
        x_train=ds.x_train[rows],
        y_train=ds.y_train[rows],
        source=f"{ds.source}; {len(rows)} of {len(ds.y_train)} training examples (seed {seed})",
    )


class Regression(NamedTuple):
    """A regression task: `(train, val, test)` dicts of `{"x", "y"}` and the true
    coefficients `w` (with `k` nonzeros)."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    w: np.ndarray


def sparse_regression(
    n: int = 100, d: int = 200, k: int = 10, noise: float = 0.5, seed: int = 0
) -> Regression:
    """`y = X·w* + ε`, `X` standard normal `(n, d)`, `w*` with `k` entries ±1 at random
    places and zeros elsewhere, `ε ~ N(0, noise²)`. Validation and test sets have `n`
    examples each. With `n < d`, least squares interpolates and L1 recovers `w*`."""
    if not 0 < k <= d:
        raise ValueError(f"need 0 < k <= d, got k={k}, d={d}")
    rng = np.random.default_rng(seed)
    w = np.zeros(d, np.float32)
    w[rng.choice(d, k, replace=False)] = rng.choice([-1.0, 1.0], k)

    def split() -> dict[str, np.ndarray]:
        x = rng.standard_normal((n, d)).astype(np.float32)
        return {"x": x, "y": (x @ w + noise * rng.standard_normal(n)).astype(np.float32)}

    return Regression(split(), split(), split(), w)
