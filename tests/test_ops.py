"""Tests for wdjax.lab.ops: the convolution and 2x2 max-pool whose backward passes are
written as forward convolutions and elementwise ops. Values and gradients (with respect
to the input and the kernel) equal those of ``lax.conv_general_dilated`` and of
``lax.reduce_window`` max-pooling (what ``nnx.max_pool`` does), for SAME, VALID and
explicit padding, odd spatial sizes, several kernel shapes and channel counts, in a
plain ``jit`` and inside ``lax.scan``."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wdjax.lab import ops

NHWC = ("NHWC", "HWIO", "NHWC")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    """NumPy draws: eager ``jax.random`` compiles once per shape, which adds up here."""
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _arrays(batch: int, hw: tuple[int, int], kernel: tuple[int, int], cin: int, cout: int):
    """An input, a kernel with unit-variance outputs, and a seed for cotangents."""
    seed = sum(hw) * 100 + sum(kernel) * 10 + cin
    x = _normal(seed, (batch, *hw, cin))
    w = _normal(seed + 1, (*kernel, cin, cout), 1 / np.sqrt(kernel[0] * kernel[1] * cin))
    return x, w, seed + 2


def _reference(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)


def _ours(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # as nnx.Conv passes it
    return ops.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)


def _value_and_grads(conv, x, w, padding, key):
    """``conv``'s output and the gradients of ``Σ conv(x, w)·c`` for a random cotangent."""
    y = conv(x, w, padding)
    c = _normal(key, y.shape)
    grads = jax.grad(lambda x, w: jnp.sum(conv(x, w, padding) * c), (0, 1))(x, w)
    return y, grads


CONV_CASES = [
    # (spatial, kernel, cin, cout)
    ((7, 9), (3, 3), 3, 8),
    ((7, 9), (5, 3), 1, 4),
    ((7, 9), (3, 5), 4, 1),
    ((7, 9), (4, 2), 2, 3),  # even kernel: SAME pads unevenly
    ((8, 6), (3, 3), 5, 2),
    ((5, 5), (5, 5), 2, 6),  # kernel as large as the image
]
PADDINGS = ["SAME", "VALID", ((1, 2), (0, 1))]


@pytest.mark.parametrize("padding", PADDINGS, ids=["SAME", "VALID", "explicit"])
@pytest.mark.parametrize(
    ("hw", "kernel", "cin", "cout"),
    CONV_CASES,
    ids=[f"{h}x{w}-k{a}x{b}-{i}to{o}" for (h, w), (a, b), i, o in CONV_CASES],
)
def test_conv_values_and_gradients_equal_lax(hw, kernel, cin, cout, padding):
    x, w, key = _arrays(2, hw, kernel, cin, cout)
    ours = jax.jit(_value_and_grads, static_argnums=(0, 3, 4))(_ours, x, w, padding, key)
    theirs = jax.jit(_value_and_grads, static_argnums=(0, 3, 4))(_reference, x, w, padding, key)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
    chex.assert_trees_all_close(ours, theirs, **TOL)
    chex.assert_tree_all_finite(ours)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv2d_with_explicit_pads_equals_lax(padding):
    x, w, key = _arrays(3, (7, 9), (5, 3), 3, 4)
    pads = tuple(
        tuple(int(p) for p in pair)
        for pair in jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (1, 1), padding)
    )
    ours = _value_and_grads(lambda x, w, p: ops.conv2d(x, w, p), x, w, pads, key)
    theirs = _value_and_grads(_reference, x, w, padding, key)
    chex.assert_trees_all_close(ours, theirs, **TOL)


def test_the_plain_case_takes_the_custom_gradient_and_others_fall_through():
    x, w, _ = _arrays(1, (7, 9), (3, 3), 2, 2)

    def primitives(f, *args):
        return {e.primitive.name for e in jax.make_jaxpr(f)(*args).eqns}

    assert "custom_vjp_call" in primitives(lambda x, w: _ours(x, w, "SAME"), x, w)
    # strided, dilated or grouped convolutions go to lax unchanged, and still agree
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    for kwargs in [
        {"window_strides": (2, 2)},
        {"window_strides": (1, 1), "rhs_dilation": (2, 1)},
        {"window_strides": (1, 1), "feature_group_count": 2},
    ]:
        ww = w[:, :, :1] if kwargs.get("feature_group_count") else w

        def f(x, w, kwargs=kwargs):
            return ops.conv_general_dilated(x, w, padding="SAME", dimension_numbers=dn, **kwargs)

        def g(x, w, kwargs=kwargs):
            return jax.lax.conv_general_dilated(
                x, w, padding="SAME", dimension_numbers=dn, **kwargs
            )

        assert "custom_vjp_call" not in primitives(f, x, ww)
        chex.assert_trees_all_close(f(x, ww), g(x, ww), **TOL)


def test_inside_nnx_conv():
    """As ``nnx.Conv(conv_general_dilated=ops.conv_general_dilated)`` uses it."""
    x, _, key = _arrays(2, (7, 9), (3, 3), 3, 5)
    ours = nnx.Conv(3, 5, (5, 3), conv_general_dilated=ops.conv_general_dilated, rngs=nnx.Rngs(0))
    theirs = nnx.Conv(3, 5, (5, 3), rngs=nnx.Rngs(0))

    @nnx.jit
    def value_and_grads(model):
        y = model(x)
        c = _normal(key, y.shape)
        return y, nnx.grad(lambda m, x: jnp.sum(m(x) * c), argnums=(0, 1))(model, x)

    chex.assert_trees_all_close(value_and_grads(ours), value_and_grads(theirs), **TOL)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_gradients_inside_scan(padding):
    """The training loop's setting: gradients taken inside ``lax.scan``, the kernel
    carried and updated, several steps."""
    x, w, key = _arrays(4, (7, 9), (5, 3), 3, 4)
    cts = _normal(key, (3, *_reference(x, w, padding).shape))
    xs = jnp.stack([x, 0.5 * x, -x])

    def train(conv):
        def body(w, inputs):
            x, c = inputs
            loss, (gx, gw) = jax.value_and_grad(
                lambda x, w: jnp.sum(jax.nn.relu(conv(x, w, padding)) * c), (0, 1)
            )(x, w)
            return w - 0.1 * gw, (loss, gx)

        return jax.jit(lambda w: jax.lax.scan(body, w, (xs, cts)))(w)

    chex.assert_trees_all_close(train(_ours), train(_reference), **TOL)


# ------------------------------------------------------------------ max-pool


def _reduce_window_pool(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _nnx_pool(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), (2, 2), "VALID")


@pytest.mark.parametrize(
    ("hw", "channels"),
    [((7, 9), 3), ((8, 8), 1), ((3, 2), 2), ((2, 5), 1)],
    ids=["7x9x3", "8x8x1", "3x2x2", "2x5x1"],
)
def test_max_pool_values_and_gradients_equal_reduce_window(hw, channels):
    x = _normal(hw[0] * 10 + hw[1], (2, *hw, channels))  # no ties
    c = _normal(1, (2, hw[0] // 2, hw[1] // 2, channels))

    @functools.partial(jax.jit, static_argnums=1)
    def value_and_grad(x, pool):
        return pool(x), jax.grad(lambda x: jnp.sum(pool(x) * c))(x)

    ours = value_and_grad(x, ops.max_pool_2x2)
    theirs = value_and_grad(x, _reduce_window_pool)
    chex.assert_trees_all_equal(value_and_grad(x, _nnx_pool), theirs)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
    chex.assert_trees_all_equal(ours, theirs)  # a max and its one-hot gradient are exact


def test_max_pool_after_relu_ties_have_the_same_gradient():
    """Ties after a ReLU are zeros, whose gradient is zero either way."""
    x = _normal(3, (2, 7, 9, 3)) - 1.0  # mostly negative
    c = _normal(4, (2, 3, 4, 3))

    @functools.partial(jax.jit, static_argnums=0)
    def grad(pool):
        return jax.grad(lambda x: jnp.sum(pool(jax.nn.relu(x)) * c))(x)

    assert int(jnp.sum(jax.nn.relu(x) == 0)) > x.size // 2
    chex.assert_trees_all_equal(grad(ops.max_pool_2x2), grad(_reduce_window_pool))


@pytest.mark.parametrize("ties", [1, 2, 3, 4])
def test_max_pool_shares_a_windows_gradient_equally_among_its_tied_maxima(ties):
    """A window whose max is reached by `ties` elements gives each of them ∂y/ties and
    the others nothing: the window's gradient sums to ∂y whatever the ties."""
    window = jnp.array([2.0] * ties + [1.0] * (4 - ties)).reshape(1, 2, 2, 1)
    dy = 3.0
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x)) * dy)(window)
    want = np.where(np.asarray(window) == 2.0, dy / ties, 0.0)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6)


def test_conv_and_pool_inside_scan():
    """A conv → ReLU → pool block, its gradients taken inside ``lax.scan``."""
    x, w, key = _arrays(2, (7, 9), (3, 3), 2, 3)
    c = _normal(key, (4, 2, 3, 4, 3))

    def run(conv, pool):
        def body(w, c):
            def loss(x, w):
                return jnp.sum(pool(jax.nn.relu(conv(x, w, "SAME"))) * c)

            gx, gw = jax.grad(loss, (0, 1))(x, w)
            return w - 0.05 * gw, gx

        return jax.jit(lambda w: jax.lax.scan(body, w, c))(w)

    chex.assert_trees_all_close(
        run(_ours, ops.max_pool_2x2), run(_reference, _reduce_window_pool), **TOL
    )
