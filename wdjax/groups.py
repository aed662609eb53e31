"""How strongly each parameter is regularized: rates, per group or per leaf.

A *rate* is

* a scalar λ, concrete or traced (`jax.vmap` over it for sweeps);
* a schedule `step -> λ` (transforms evaluate it at their step count);
* a pytree of per-leaf rates shaped like the params, or a prefix of them;
* a
  [`RateMap`][wdjax.groups.RateMap]
  built by
  [`rates`][wdjax.groups.rates]:
  `{glob: λ}` with a
  fallback, like
  PyTorch param groups.

Rates are validated once, by the public factory that receives them
([`check_rate_arg`][wdjax.groups.check_rate_arg]): real, finite
and `≥ 0`. Traced values and schedules are checked where they are
evaluated.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from wdjax.masks import _fit_tree, _preview, leaves_with_paths, resolve
from wdjax.types import Mask, Params, Rate


def check_rate(value: Any, what: str = "rate") -> None:
    """Raise `ValueError` unless a concrete `value` is a real, finite number `≥ 0`
    (bools and strings are refused). Schedules and traced values pass."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if np.any(arr < 0):
        raise ValueError(f"{what} must be >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class RateMap:
    """Per-group rates: the first pattern (glob) that matches a leaf gives its rate;
    leaves no pattern matches get `default`. Built by [`rates`][wdjax.groups.rates]."""

    groups: tuple[tuple[str, Any], ...]
    default: Any = 0.0

    def resolve(self, params: Params) -> list[Any]:
        """One rate per leaf; a pattern that matches no leaf raises `ValueError`."""
        paths = [p for p, _ in leaves_with_paths(params)]
        for pattern, _ in self.groups:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise ValueError(
                    f"rate pattern {pattern!r} matches no parameter; paths are: {_preview(paths)}"
                )
        return [
            next((r for pat, r in self.groups if fnmatch.fnmatchcase(p, pat)), self.default)
            for p in paths
        ]


def rates(groups: Mapping[str, Any], default: Any = 0.0) -> RateMap:
    """`rates({"*/kernel": 1e-4, "*embedding": 1e-5}, default=0.0)`: per-group rates."""
    for pattern, rate in groups.items():
        check_rate(rate, f"rate for {pattern!r}")
    check_rate(default, "default rate")
    return RateMap(tuple(groups.items()), default)


def check_rate_arg(rate: Rate, what: str = "rate") -> None:
    """Check every concrete value of a
    scalar, schedule, rate pytree or
    [`RateMap`][wdjax.groups.RateMap]
    (a RateMap was checked when built)."""
    if isinstance(rate, RateMap):
        return
    leaves = jax.tree.leaves(rate)
    if not leaves:
        raise ValueError(
            f"{what} must be a number, a schedule, a pytree of rates or wdjax.rates(...), "
            f"got {rate!r}"
        )
    for leaf in leaves:
        check_rate(leaf, what)


def _is_scalar(rate: Any) -> bool:
    return isinstance(rate, (int, float, np.number)) or (
        hasattr(rate, "shape") and np.ndim(rate) == 0
    )


def leaf_rates(params: Params, rate: Rate, mask: Mask = None) -> list[Any]:
    """One rate per leaf of `params` (flattening order), `None` where the leaf is
    left alone: masked out, non-float, or a rate that is the literal `0`.

    `rate` is a scalar (concrete or traced), a [`RateMap`][wdjax.groups.RateMap], or a pytree of
    per-leaf rates shaped like the params (or a prefix of them). Values are not
    checked here: the public factory that took `rate` did that. A mask and a
    [`RateMap`][wdjax.groups.RateMap] with some nonzero rate that together select nothing
    raise `ValueError`."""
    chosen = resolve(params, mask)
    if isinstance(rate, RateMap):
        values = rate.resolve(params)
    elif _is_scalar(rate):
        values = [rate] * len(chosen)
    else:
        values = _fit_tree(rate, params, "rate")
    out = [
        v if c and not (isinstance(v, (int, float)) and v == 0) else None
        for c, v in zip(chosen, values, strict=True)
    ]
    nonzero = [r for _, r in rate.groups] + [rate.default] if isinstance(rate, RateMap) else []
    if any(chosen) and all(v is None for v in out) and any(r != 0 for r in nonzero):
        picked = [p for (p, _), c in zip(leaves_with_paths(params), chosen, strict=True) if c]
        raise ValueError(
            f"the mask and the rates {dict(rate.groups)} (default {rate.default}) together "
            f"select nothing: the mask selects {_preview(picked)}, where every rate is 0"
        )
    return out
