"""The vocabulary of wdjax: the types every module annotates with, and dtype helpers.

* `Params`: a pytree of arrays (a linen dict, an `nnx.State`, an Equinox module).
* `Scalar`: a float, or a 0-d (possibly traced) array.
* `Schedule`: `step -> value`, as in Optax; `ScalarOrSchedule`: either.
* `Rate`: a scalar or schedule, a pytree of per-leaf rates, or a
  [`wdjax.groups.RateMap`][].
* `Mask`: `None`, a [`wdjax.masks.Selector`][], glob string(s), a bool pytree
  (or a prefix of one), or `params -> bool pytree`.
* `Coupling`: what multiplies λ in decoupled decay, `"lr"`, `"schedule"`,
  `"corrected"` or `"constant"`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import chex
import jax
import jax.numpy as jnp

Params: TypeAlias = chex.ArrayTree
Updates: TypeAlias = chex.ArrayTree
Scalar: TypeAlias = chex.Numeric
Schedule: TypeAlias = Callable[[chex.Numeric], chex.Numeric]
ScalarOrSchedule: TypeAlias = "float | jax.Array | Schedule"
Rate: TypeAlias = Any  # ScalarOrSchedule | per-leaf pytree | wdjax.rates.RateMap
Mask: TypeAlias = Any  # None | Selector | str | Sequence[str] | bool pytree | callable
Predicate: TypeAlias = Callable[[str, Any], bool]
Coupling: TypeAlias = Literal["lr", "schedule", "corrected", "constant"]
COUPLINGS: tuple[str, ...] = ("lr", "schedule", "corrected", "constant")


def is_float(leaf: Any) -> bool:
    """True for floating-point and complex arrays: the only leaves that are ever
    regularized (complex ones as Optax does, `u ← u − c·λ·w`, no conjugation)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def sq(x: jax.Array) -> jax.Array:
    """`|x|²` elementwise, real for real and complex `x`."""
    return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x


def f32(x: jax.Array) -> jax.Array:
    """`x` in at least float32 (bfloat16/float16 are promoted, float64 is kept)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
