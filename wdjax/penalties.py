"""Penalty terms R(w) over a params pytree, and [`regularized`][wdjax.penalties.regularized] to add
them to a loss.

Conventions (the textbook ones; see the README table for Keras/PyTorch/Optax):

| call                   | R(w)                               | ∂R/∂w            |
| ---------------------- | ---------------------------------- | ---------------- |
| `l2(λ)`                | λ/2 · Σ w²                         | λ · w            |
| `l1(λ)`                | λ · Σ \\|w\\|                        | λ · sign(w)      |
| `elastic_net(α, λ)`    | α · Σ \\|w\\| + λ/2 · Σ w²           | α·sign(w) + λ·w  |
| `l2_toward(w₀, λ)`     | λ/2 · Σ (w − w₀)²                  | λ · (w − w₀)     |
| `group_lasso(λ, axis)` | λ · Σ_g ‖w_g‖₂ (norms over `axis`) | λ · w_g / ‖w_g‖₂ |

Keras `regularizers.l2(k)` is `k · Σ w²` (no ½): it equals `wdjax.l2(2k)`.
Each penalty is a pure function of the params (float32 accumulation for low-precision
leaves) and works under `jit`, `grad` and `vmap`; `rate` may be traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from wdjax import groups, masks
from wdjax.types import Mask, Params, Rate, f32, sq

Term = Callable[[jax.Array, Any], jax.Array]  # (leaf in float32, aligned extra) -> scalar


@dataclasses.dataclass(frozen=True, eq=False)
class Penalty:
    """A named penalty `R(params) -> scalar`; build one with [`l2`][wdjax.penalties.l2] and
    friends."""

    name: str
    fn: Callable[[Params], jax.Array]

    def __call__(self, params: Params) -> jax.Array:
        return self.fn(params)


def _penalty(name: str, rate: Rate, mask: Mask, term: Term, extra: Any = None) -> Penalty:
    """Σ over selected leaves of `rate_leaf · term(w, extra_leaf)`."""
    groups.check_rate_arg(rate, f"{name} rate")

    def fn(params: Params) -> jax.Array:
        leaves, treedef = masks.flatten(params)
        extras = [None] * len(leaves) if extra is None else treedef.flatten_up_to(extra)
        total = jnp.zeros((), jnp.float32)
        for w, e, r in zip(leaves, extras, groups.leaf_rates(params, rate, mask), strict=True):
            if r is not None:
                total = total + r * term(f32(w), e)
        return total

    return Penalty(name, fn)


def _half_sq(w: jax.Array, _: Any) -> jax.Array:
    return 0.5 * jnp.sum(sq(w))


def _abs(w: jax.Array, _: Any) -> jax.Array:
    return jnp.sum(jnp.abs(w))


def l2(rate: Rate, mask: Mask = None) -> Penalty:
    """`R(w) = rate/2 · Σ w²`, gradient `rate · w`."""
    return _penalty("l2", rate, mask, _half_sq)


def l1(rate: Rate, mask: Mask = None) -> Penalty:
    """`R(w) = rate · Σ |w|`
    (subgradient
    0 at 0;
    [`wdjax.l1_proximal`][wdjax.transforms.l1_proximal]
    gives
    exact
    zeros)."""
    return _penalty("l1", rate, mask, _abs)


def elastic_net(l1: Rate, l2: Rate, mask: Mask = None) -> Penalty:
    """`R(w) = l1 · Σ |w| + l2/2 · Σ w²`."""
    a, b = _penalty("l1", l1, mask, _abs), _penalty("l2", l2, mask, _half_sq)
    return Penalty("elastic_net", lambda params: a(params) + b(params))


def l2_toward(anchor: Params, rate: Rate, mask: Mask = None) -> Penalty:
    """`R(w) = rate/2 · Σ (w − w₀)²` toward reference weights `anchor` (L2-SP)."""
    return _penalty(
        "l2_toward",
        rate,
        mask,
        lambda w, w0: 0.5 * jnp.sum(sq(w - f32(jnp.asarray(w0)))),
        anchor,
    )


def _safe_norm(sq: jax.Array) -> jax.Array:
    """√sq with gradient 0 (a valid subgradient) where sq == 0, instead of NaN."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def group_lasso(rate: Rate, axis: int | Sequence[int], mask: Mask = None) -> Penalty:
    """`R(w) = rate · Σ_g ‖w_g‖₂`: each group is one slice of `w` over `axis`
    (for a Dense kernel `(in, out)`, `axis=0` gives one group per output unit)."""
    return _penalty(
        "group_lasso", rate, mask, lambda w, _: jnp.sum(_safe_norm(jnp.sum(sq(w), axis=axis)))
    )


def regularized(
    loss_fn: Callable[..., Any], *penalties: Penalty, has_aux: bool = False
) -> Callable[..., tuple]:
    """`f(params, *args) -> (data_loss + Σ R_i(params), aux)`.

    `aux` is `{"data_loss": ..., <penalty name>: value, ...}` (repeated names get
    `_2`, `_3`...), plus `"aux"` holding `loss_fn`'s own aux when
    `has_aux=True`. Ready for `jax.value_and_grad(f, has_aux=True)`."""
    names: list[str] = []
    for p in penalties:
        if not isinstance(p, Penalty):
            raise TypeError(f"regularized() takes wdjax penalties, got {type(p).__name__}")
        n, k = p.name, 2
        while n in names or n == "data_loss":
            n, k = f"{p.name}_{k}", k + 1
        names.append(n)

    def total(params: Params, *args: Any, **kwargs: Any) -> tuple[jax.Array, dict]:
        out = loss_fn(params, *args, **kwargs)
        data_loss, inner = out if has_aux else (out, None)
        aux = {"data_loss": data_loss} | {
            n: p(params) for n, p in zip(names, penalties, strict=True)
        }
        if has_aux:
            aux["aux"] = inner
        return data_loss + sum(aux[n] for n in names), aux

    return total
