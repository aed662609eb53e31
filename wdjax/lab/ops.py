"""Convolution and pooling with backward passes XLA:CPU runs fast inside `lax.scan`.

XLA:CPU has a fast (Eigen) kernel only for the plain NHWC/HWIO forward convolution. In a
plain `jit` it rewrites the transposed convolutions of JAX's autodiff into that form;
inside a `while` loop (`lax.scan`, which [`wdjax.lab.train.fit`][] uses) it does not,
and they run as naive loops, ~10x slower (jax-ml/jax#12868). The gradient of
`reduce_window` max-pooling is a scatter, also a scalar loop on CPU. Here both
backward passes are written as ordinary forward convolutions and one elementwise pass;
values and gradients equal those of `lax.conv_general_dilated` and `nnx.max_pool`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 NHWC/HWIO convolution `y = x ⋆ w` with explicit `padding`."""
    return _conv(x, w, padding)


def _conv2d_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _conv2d_bwd(padding, res, dy):
    (x, w), ((top, bottom), (left, right)) = res, padding
    kh, kw = w.shape[:2]
    # ∂x: dy correlated with the flipped kernel, input/output channels swapped.
    dx = _conv(
        dy,
        jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2),
        ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
    )
    # ∂w[i, j, c, o] = Σ_{n,h,w} x_pad[n, h+i, w+j, c]·dy[n, h, w, o]: the batch is contracted.
    dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding).transpose(1, 2, 0, 3)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    **kwargs: Any,
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (`nnx.Conv(conv_general_dilated=...)`):
    the plain 2-D case (stride 1, no dilation, one group, NHWC/HWIO) goes through
    [`conv2d`][wdjax.lab.ops.conv2d]; anything else falls through to `lax` unchanged."""
    plain = (
        lhs.ndim == 4
        and tuple(window_strides) == (1, 1)
        and all(d in (None, (1, 1), [1, 1]) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and not any(v is not None for k, v in kwargs.items() if k != "precision")
    )
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, **kwargs,
        )  # fmt: skip
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    return conv2d(lhs, rhs, tuple(tuple(int(p) for p in pair) for pair in padding))


def _quarters(x: jax.Array) -> list[list[jax.Array]]:
    """`x[:, a::2, b::2]` for a, b ∈ {0, 1}, an odd last row or column dropped."""
    x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    return [[x[:, a::2, b::2] for b in (0, 1)] for a in (0, 1)]


def _max_of_quarters(x: jax.Array) -> jax.Array:
    (q00, q01), (q10, q11) = _quarters(x)
    return jnp.maximum(jnp.maximum(q00, q01), jnp.maximum(q10, q11))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, VALID, on NHWC: `y[i, j] = max_{a,b∈{0,1}} x[2i+a, 2j+b]`.
    Its backward pass is one elementwise pass over `x`:
    `∂x[2i+a, 2j+b] = ∂y[i, j]·[x[2i+a, 2j+b] = y[i, j]] / #ties[i, j]`. At exact ties the
    window's gradient is shared equally where `reduce_window` gives it to one element;
    after a ReLU such ties are zeros, whose gradient is zero either way."""
    return _max_of_quarters(x)


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _max_of_quarters(x)
    return y, (x, y)


def _max_pool_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array]:
    x, y = res
    hits = [[(q == y).astype(dy.dtype) for q in row] for row in _quarters(x)]
    share = dy / sum(h for row in hits for h in row)
    # rows a, columns b interleaved: (n, h, 2, w, 2, c) is (n, 2h, 2w, c) in memory
    dx = jnp.stack([jnp.stack([h * share for h in row], axis=3) for row in hits], axis=2)
    n, h, w, c = y.shape
    dx = dx.reshape(n, 2 * h, 2 * w, c)
    return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - 2 * h), (0, x.shape[2] - 2 * w), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
