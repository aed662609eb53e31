"""k-fold cross-validation as row indices into one copy of the data."""

from __future__ import annotations

import numpy as np


def kfold_rows(
    y: np.ndarray, folds: int, seed: int = 0, stratified: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices `(train, held_out)`, shapes `(folds, (folds−1)·m)` and `(folds, m)`
    with `m = ⌊n/folds⌋`, for `n = len(y)` examples: a seeded permutation (grouped
    by the labels `y` when `stratified`, so every fold gets each class in
    proportion, to within one row) dealt round-robin into folds; the `n mod folds`
    rows left over (at most one per fold) are dropped."""
    y = np.asarray(y)
    if not 2 <= folds <= len(y):
        raise ValueError(f"folds must be in [2, {len(y)}], got {folds}")
    order = np.random.default_rng(seed).permutation(len(y))
    if stratified:
        order = order[np.argsort(y[order], kind="stable")]
    m = len(y) // folds
    held = np.stack([order[f::folds][:m] for f in range(folds)]).astype(np.int32)
    train = np.stack([np.delete(held, f, axis=0).ravel() for f in range(folds)])
    return train, held
