"""How many sweep members fit in memory at once."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex

CPU_MEMORY_BUDGET = 4 << 30  # bytes for a sweep's members when the device reports no limit
DEVICE_MEMORY_FRACTION = 0.5  # of the device's free memory, when it reports a limit


def nbytes(tree: Any) -> int:
    """Bytes of the arrays (or shape-dtype structs) of a pytree."""
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _intermediate_bytes(jaxpr: jex.Jaxpr) -> int:
    own = sum(nbytes([v.aval for v in eqn.outvars]) for eqn in jaxpr.eqns)
    return own + sum(_intermediate_bytes(sub) for sub in jex.subjaxprs(jaxpr))


def member_bytes(step: Callable, state: Any, batch: Any) -> int:
    """Bytes one member needs: its state plus every intermediate value of one
    `step(state, batch)` (summed over the step's jaxpr: an upper bound on its live
    activations). `state` and `batch` may be shape-dtype structs."""
    jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
    return nbytes(state) + _intermediate_bytes(jaxpr)


def memory_budget() -> int:
    """Bytes for a sweep's members: `DEVICE_MEMORY_FRACTION` of the free memory of
    this process's first device if it reports `memory_stats()`, else
    `CPU_MEMORY_BUDGET`."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return CPU_MEMORY_BUDGET
    return int(DEVICE_MEMORY_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
