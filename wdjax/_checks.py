"""Argument checks shared by penalties, masks and transforms."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_rate(value: Any, what: str = "rate") -> None:
    """Raise ``ValueError`` for a negative or non-finite concrete rate.

    Schedules (callables) and traced values pass: they are checked where they are
    evaluated, or not at all inside ``jit``."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if np.any(arr < 0):
        raise ValueError(f"{what} must be >= 0, got {value!r}")
