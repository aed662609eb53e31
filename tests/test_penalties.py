"""Tests for wdjax.penalties: closed forms, rates and masks, jit/grad/vmap,
``regularized``, low precision, bad input, and hypothesis properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PROPERTY, f32, float_trees, tol
from hypothesis import given
from hypothesis import strategies as st

import wdjax
from wdjax import masks

PARAMS = {
    "dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.array([1.0, -1.0])},
    "head": {"kernel": jnp.array([[2.0], [-4.0]]), "bias": jnp.array([0.25])},
}


# -------------------------------------------------------------- closed forms


def test_values_are_the_documented_closed_forms():
    k1, b1, k2, b2 = (
        f32(PARAMS["dense"]["kernel"]),
        f32(PARAMS["dense"]["bias"]),
        f32(PARAMS["head"]["kernel"]),
        f32(PARAMS["head"]["bias"]),
    )
    sq = (k1**2).sum() + (b1**2).sum() + (k2**2).sum() + (b2**2).sum()
    ab = np.abs(k1).sum() + np.abs(b1).sum() + np.abs(k2).sum() + np.abs(b2).sum()
    np.testing.assert_allclose(wdjax.l2(0.3)(PARAMS), 0.3 / 2 * sq, rtol=1e-6)
    np.testing.assert_allclose(wdjax.l1(0.3)(PARAMS), 0.3 * ab, rtol=1e-6)
    np.testing.assert_allclose(wdjax.elastic_net(0.1, 0.2)(PARAMS), 0.1 * ab + 0.1 * sq, rtol=1e-6)
    anchor = jax.tree.map(lambda x: 0.5 * x + 1.0, PARAMS)
    dsq = sum(
        ((f32(w) - f32(a)) ** 2).sum()
        for w, a in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(anchor), strict=True)
    )
    np.testing.assert_allclose(wdjax.l2_toward(anchor, 0.4)(PARAMS), 0.2 * dsq, rtol=1e-6)
    # group lasso over axis 0 of a (in, out) kernel: one group per output unit
    gl = np.linalg.norm(k1, axis=0).sum() + np.linalg.norm(k2, axis=0).sum()
    np.testing.assert_allclose(
        wdjax.group_lasso(0.7, axis=0, mask="*/kernel")(PARAMS), 0.7 * gl, rtol=1e-6
    )
    gl1 = np.linalg.norm(k1, axis=1).sum() + np.linalg.norm(k2, axis=1).sum()
    np.testing.assert_allclose(
        wdjax.group_lasso(0.7, axis=1, mask="*/kernel")(PARAMS), 0.7 * gl1, rtol=1e-6
    )
    np.testing.assert_allclose(
        wdjax.group_lasso(1.0, axis=(0, 1), mask="*/kernel")(PARAMS),
        np.linalg.norm(k1) + np.linalg.norm(k2),
        rtol=1e-6,
    )


def test_masks_and_rate_forms():
    k1, k2 = f32(PARAMS["dense"]["kernel"]), f32(PARAMS["head"]["kernel"])
    kernels_only = 0.5 * ((k1**2).sum() + (k2**2).sum())
    np.testing.assert_allclose(wdjax.l2(1.0, masks.default())(PARAMS), kernels_only, rtol=1e-6)
    np.testing.assert_allclose(wdjax.l2(1.0, "*/kernel")(PARAMS), kernels_only, rtol=1e-6)
    per_leaf = {"dense": {"kernel": 1.0, "bias": 0.0}, "head": 3.0}
    expected = 0.5 * ((k1**2).sum() + 3 * (k2**2).sum() + 3 * 0.25**2)
    np.testing.assert_allclose(wdjax.l2(per_leaf)(PARAMS), expected, rtol=1e-6)
    rm = wdjax.rates({"head/*": 3.0, "*/kernel": 1.0})
    np.testing.assert_allclose(wdjax.l2(rm)(PARAMS), expected, rtol=1e-6)
    assert float(wdjax.l2(0.5, masks.NONE)(PARAMS)) == 0.0


def test_jit_grad_and_vmap_over_a_traced_rate():
    lam = jnp.array([0.0, 0.5, 2.0])
    values = jax.vmap(lambda r: wdjax.l2(r, masks.default())(PARAMS))(lam)
    base = float(wdjax.l2(1.0, masks.default())(PARAMS))
    np.testing.assert_allclose(values, base * np.asarray(lam), rtol=1e-6)

    grads = jax.jit(jax.vmap(jax.grad(lambda p, r: wdjax.l2(r)(p)), in_axes=(None, 0)))(PARAMS, lam)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(PARAMS), strict=True):
        np.testing.assert_allclose(
            g, np.asarray(lam).reshape(-1, *[1] * w.ndim) * f32(w), rtol=1e-6
        )

    # vmap over the params too (e.g. an ensemble)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), PARAMS)
    per_member = jax.vmap(wdjax.l1(1.0))(stacked)
    np.testing.assert_allclose(
        per_member, [float(wdjax.l1(1.0)(PARAMS)), 2 * float(wdjax.l1(1.0)(PARAMS))], rtol=1e-6
    )


def test_group_lasso_gradient_is_finite_at_a_zero_group():
    w = {"k": jnp.array([[0.0, 3.0], [0.0, 4.0]])}
    g = jax.grad(wdjax.group_lasso(2.0, axis=0))(w)["k"]
    np.testing.assert_allclose(g, [[0.0, 2 * 0.6], [0.0, 2 * 0.8]], rtol=1e-6)


def test_low_precision_leaves_accumulate_in_float32():
    w = jnp.full((4096,), 1.0, jnp.bfloat16)  # 4096 + 1 rounds to 4096 in bfloat16
    value = wdjax.l2(2.0)({"w": w, "b": jnp.ones(1, jnp.bfloat16)})
    assert value.dtype == jnp.float32
    assert float(value) == 4097.0
    g = jax.grad(wdjax.l2(0.5))({"w": w})["w"]
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(f32(g), 0.5)


# ----------------------------------------------------------------- regularized


def test_regularized_total_aux_and_value_and_grad():
    x, y = jnp.array([[1.0, 2.0]]), jnp.array([[0.5]])

    def mse(p, x, y):
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2)

    pen = [wdjax.l2(0.1, masks.default()), wdjax.l1(0.01), wdjax.l2(0.2, "head/*")]
    f = wdjax.regularized(mse, *pen)
    (total, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(PARAMS, x, y)
    assert set(aux) == {"data_loss", "l2", "l1", "l2_2"}
    np.testing.assert_allclose(aux["data_loss"], mse(PARAMS, x, y), rtol=1e-6)
    for name, p in zip(["l2", "l1", "l2_2"], pen, strict=True):
        np.testing.assert_allclose(aux[name], p(PARAMS), rtol=1e-6)
    np.testing.assert_allclose(
        total, aux["data_loss"] + aux["l2"] + aux["l1"] + aux["l2_2"], rtol=1e-6
    )
    expected = jax.jit(jax.grad(lambda p: mse(p, x, y) + sum(q(p) for q in pen)))(PARAMS)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_regularized_passes_the_loss_aux_through():
    f = wdjax.regularized(
        lambda p: (jnp.sum(p["dense"]["bias"]), {"acc": 1.0}), wdjax.l1(1.0), has_aux=True
    )
    total, aux = f(PARAMS)
    assert aux["aux"] == {"acc": 1.0}
    np.testing.assert_allclose(total, 0.0 + float(wdjax.l1(1.0)(PARAMS)), rtol=1e-6)
    with pytest.raises(TypeError, match="regularized\\(\\) takes wdjax penalties, got function"):
        wdjax.regularized(lambda p: 0.0, lambda p: 1.0)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        (-0.1, "must be >= 0"),
        (float("nan"), "must be finite"),
        (float("inf"), "must be finite"),
        (None, "must be a number"),
    ],
)
def test_bad_rates_raise(bad, msg):
    with pytest.raises(ValueError, match=f"l2 rate {msg}"):
        wdjax.l2(bad)
    with pytest.raises(ValueError, match=f"l1 rate {msg}"):
        wdjax.l1(bad)
    with pytest.raises(ValueError, match=f"l1 rate {msg}"):
        wdjax.elastic_net(bad, 0.1)
    with pytest.raises(ValueError, match=f"l2 rate {msg}"):
        wdjax.elastic_net(0.1, bad)
    with pytest.raises(ValueError, match=f"l2_toward rate {msg}"):
        wdjax.l2_toward(PARAMS, bad)
    with pytest.raises(ValueError, match=f"group_lasso rate {msg}"):
        wdjax.group_lasso(bad, axis=0)
    if bad is not None:
        with pytest.raises(ValueError, match=f"l2 rate {msg}"):
            wdjax.l2({"dense": 1.0, "head": bad})


def test_bad_masks_raise_when_applied():
    with pytest.raises(ValueError, match="mask pattern 'conv/\\*' matches no parameter"):
        wdjax.l2(0.1, "conv/*")(PARAMS)
    with pytest.raises(ValueError, match="no entry for parameter 'head/bias'"):
        wdjax.l1(0.1, {"dense": True, "head": {"kernel": True}})(PARAMS)


# ------------------------------------------------------------------ properties


@PROPERTY
@given(data=float_trees(min_ndim=1), lam=st.floats(0.0, 10.0))
def test_penalties_are_nonnegative_with_closed_form_gradients(data, lam):
    tree, like = data
    anchor = like(tree)
    leaves = jax.tree.leaves(tree)
    cases = [
        (wdjax.l2(lam), lambda w, a: lam * f32(w)),
        (wdjax.l1(lam), lambda w, a: lam * np.sign(f32(w))),  # normal draws are never 0
        (wdjax.l2_toward(anchor, lam), lambda w, a: lam * (f32(w) - f32(a))),
        (
            wdjax.group_lasso(lam, axis=0),
            lambda w, a: lam * f32(w) / np.linalg.norm(f32(w), axis=0, keepdims=True),
        ),
        (wdjax.elastic_net(lam, 2 * lam), lambda w, a: lam * np.sign(f32(w)) + 2 * lam * f32(w)),
    ]
    # one compilation per example for all penalties
    results = jax.jit(lambda t: [jax.value_and_grad(p)(t) for p, _ in cases])(tree)
    for (_, closed_form), (value, grad) in zip(cases, results, strict=True):
        assert value.shape == () and float(value) >= 0.0
        for g, w, a in zip(jax.tree.leaves(grad), leaves, jax.tree.leaves(anchor), strict=True):
            assert g.dtype == w.dtype
            expected = closed_form(w, a)
            np.testing.assert_allclose(
                f32(g),
                expected,
                rtol=tol(w.dtype),
                atol=tol(w.dtype) * (1 + np.abs(expected).max()),
            )
