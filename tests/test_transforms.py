"""Tests for wdjax.transforms: the rule of each transform, lr couplings, schedules,
cautious decay, proximal L1, max-norm, low precision, bad input, the SGD/Adam
equivalences between L2 and decoupled decay, and hypothesis properties of
``max_norm`` (norms capped, idempotent) and ``l1_proximal`` (soft-thresholding).

The properties every transform shares (identity at rate 0, masks, dtypes, traced rates,
bad rates) are in ``test_properties.py``."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    PROPERTY,
    ZEROS,
    P,
    U,
    bits,
    f32,
    float_arrays,
    max_rel_err,
    mse,
    one_step,
    trajectory,
)
from hypothesis import given
from hypothesis import strategies as st

import wdjax
from wdjax import masks

# ---------------------------------------------------------------------- rules


def test_add_l2_gradient_adds_rate_times_w_on_selected_leaves():
    out = one_step(wdjax.add_l2_gradient(0.3, masks.default()))
    np.testing.assert_allclose(
        out["dense"]["kernel"], U["dense"]["kernel"] + 0.3 * P["dense"]["kernel"], rtol=1e-6
    )
    np.testing.assert_allclose(
        out["head"]["kernel"], U["head"]["kernel"] + 0.3 * P["head"]["kernel"], rtol=1e-6
    )
    assert out["dense"]["bias"] is U["dense"]["bias"] and out["head"]["bias"] is U["head"]["bias"]
    out = one_step(wdjax.add_l2_gradient(wdjax.rates({"head/*": 2.0}, default=0.5), masks.ALL))
    np.testing.assert_allclose(
        out["dense"]["bias"], U["dense"]["bias"] + 0.5 * P["dense"]["bias"], rtol=1e-6
    )
    np.testing.assert_allclose(
        out["head"]["bias"], U["head"]["bias"] + 2.0 * P["head"]["bias"], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("coupling", "c"),
    [
        ("lr", lambda eta: eta),
        ("schedule", lambda eta: eta / 2.0),
        ("corrected", lambda eta: eta**2 / 2.0),
        ("constant", lambda eta: 1.0),
    ],
)
def test_decoupled_lr_couplings_follow_the_schedule(coupling, c):
    sched = optax.linear_schedule(1.0, 0.2, 4)  # η_t = 1.0, 0.8, 0.6, 0.4, 0.2
    tx = wdjax.decoupled_weight_decay(
        0.5, masks.ALL, learning_rate=sched, lr_coupling=coupling, max_learning_rate=2.0
    )
    state = tx.init(P)
    for t in range(5):
        out, state = tx.update(ZEROS, state, P)
        for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(P), strict=True):
            np.testing.assert_allclose(o, -c(float(sched(t))) * 0.5 * f32(w), rtol=1e-6)
    assert int(state.count) == 5


def test_schedule_coupling_with_a_constant_lr_is_lr_independent():
    for eta in (1e-3, 1.0):
        out = one_step(
            wdjax.decoupled_weight_decay(0.1, masks.ALL, learning_rate=eta, lr_coupling="schedule"),
            ZEROS,
        )
        np.testing.assert_allclose(out["dense"]["kernel"], -0.1 * P["dense"]["kernel"], rtol=1e-6)


def test_rate_as_a_schedule():
    tx = wdjax.decoupled_weight_decay(lambda t: 0.1 * (t + 1), masks.ALL, lr_coupling="constant")
    state = tx.init(P)
    for t in range(3):
        out, state = tx.update(U, state, P)
        np.testing.assert_allclose(
            out["head"]["kernel"],
            U["head"]["kernel"] - 0.1 * (t + 1) * P["head"]["kernel"],
            rtol=1e-6,
        )


def test_cautious_decays_only_where_the_update_moves_w_toward_zero():
    rng = np.random.default_rng(1)
    w = {"k": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    u = {"k": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    out = one_step(
        wdjax.decoupled_weight_decay(0.5, masks.ALL, learning_rate=0.2, cautious=True), u, w
    )["k"]
    toward_zero = f32(u["k"]) * f32(w["k"]) <= 0
    assert 10 < toward_zero.sum() < 54  # both cases occur
    np.testing.assert_allclose(
        out, np.where(toward_zero, f32(u["k"]) - 0.1 * f32(w["k"]), f32(u["k"])), rtol=1e-6
    )
    plain = one_step(wdjax.decoupled_weight_decay(0.5, masks.ALL, learning_rate=0.2), u, w)["k"]
    assert np.any(f32(plain) != f32(out))


def test_decay_toward_an_anchor():
    anchor = jax.tree.map(lambda x: 0.5 * x - 1.0, P)
    tx = wdjax.decay_toward(anchor, 0.4, masks.default(), learning_rate=0.5)
    state = tx.init(P)
    assert bits(state.anchor) == bits(anchor)  # in the state, so it is checkpointed with it
    out, _ = tx.update(U, state, P)
    np.testing.assert_allclose(
        out["dense"]["kernel"],
        U["dense"]["kernel"] - 0.2 * (P["dense"]["kernel"] - anchor["dense"]["kernel"]),
        rtol=1e-6,
    )
    assert out["dense"]["bias"] is U["dense"]["bias"]
    # cautious toward the anchor: decay where u·(w − w0) <= 0
    out = one_step(wdjax.decay_toward(anchor, 0.4, masks.ALL, learning_rate=0.5, cautious=True))
    d, u = f32(P["dense"]["kernel"]) - f32(anchor["dense"]["kernel"]), f32(U["dense"]["kernel"])
    np.testing.assert_allclose(
        out["dense"]["kernel"], np.where(u * d <= 0, u - 0.2 * d, u), rtol=1e-6
    )
    with pytest.raises(ValueError, match="anchor does not have the structure of the params"):
        wdjax.decay_toward({"dense": anchor["dense"]}, 0.1, learning_rate=0.1).init(P)


def test_l1_proximal_is_soft_thresholding():
    out = one_step(wdjax.l1_proximal(0.5, masks.ALL, learning_rate=0.4))  # threshold η·λ = 0.2
    for o, u, w in zip(jax.tree.leaves(out), jax.tree.leaves(U), jax.tree.leaves(P), strict=True):
        z = f32(w) + f32(u)
        np.testing.assert_allclose(
            f32(w) + f32(o), np.sign(z) * np.maximum(np.abs(z) - 0.2, 0), atol=1e-6
        )


def test_l1_proximal_gives_exact_zeros_where_the_l1_subgradient_does_not():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 20)), jnp.float32)
    w_true = np.zeros(20, np.float32)
    w_true[:3] = [2.0, -1.5, 1.0]
    y = x @ w_true + 0.1 * jnp.asarray(rng.normal(size=64), jnp.float32)
    batches = (jnp.broadcast_to(x, (300, 64, 20)), jnp.broadcast_to(y, (300, 64)))
    params = {"w": jnp.asarray(rng.normal(size=20), jnp.float32), "b": jnp.zeros(())}

    def loss(p, x, y):
        return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    lam, lr = 0.2, 0.05
    prox = trajectory(
        optax.chain(optax.sgd(lr), wdjax.l1_proximal(lam, "w", learning_rate=lr)),
        loss,
        300,
        params,
        batches,
    )
    sub = trajectory(
        optax.sgd(lr), lambda p, x, y: loss(p, x, y) + wdjax.l1(lam, "w")(p), 300, params, batches
    )
    w_prox, w_sub = f32(prox["w"][-1]), f32(sub["w"][-1])
    assert (w_prox == 0.0).sum() >= 10
    assert np.all(w_prox[:3] != 0)  # the true support survives
    assert (w_sub == 0.0).sum() == 0
    assert (
        np.abs(w_sub[3:]).max() < 0.1
    )  # ... although those weights are small: it only dithers around 0


def test_max_norm_caps_norms_like_keras_and_leaves_others_bitwise():
    rng = np.random.default_rng(2)
    w = {
        "k": jnp.asarray(rng.normal(size=(6, 4)) * [0.1, 0.2, 1.0, 3.0], jnp.float32),
        "b": jnp.ones(4),
    }
    u = jax.tree.map(lambda x: jnp.asarray(0.01 * rng.normal(size=x.shape), x.dtype), w)
    out = one_step(wdjax.max_norm(1.0, axis=0, mask="k"), u, w)
    new = optax.apply_updates(w, out)
    z = f32(w["k"]) + f32(u["k"])
    norms = np.linalg.norm(z, axis=0)
    assert list(norms > 1.0) == [False, False, True, True]
    assert np.all(np.linalg.norm(f32(new["k"]), axis=0) <= 1.0 * (1 + 1e-6))
    np.testing.assert_allclose(new["k"][:, 2:], z[:, 2:] / norms[2:], rtol=1e-6)  # Keras: w·c/‖w‖
    assert bits(out["k"][:, :2]) == bits(u["k"][:, :2])
    assert out["b"] is u["b"]
    out = one_step(wdjax.max_norm(0.5, axis=1, mask="k"), u, w)  # one norm per row
    assert np.all(np.linalg.norm(f32(optax.apply_updates(w, out)["k"]), axis=1) <= 0.5 * (1 + 1e-6))


# ----------------------------------------------------------------- low precision


def test_low_precision_is_computed_in_float32_and_cast_back():
    rng = np.random.default_rng(3)
    w = {"k": jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)}
    u = {"k": jnp.asarray(rng.normal(size=(64,)) * 1e-2, jnp.bfloat16)}
    for tx, rule in [
        (
            wdjax.decoupled_weight_decay(0.3, masks.ALL, learning_rate=0.1),
            lambda u, w: u - 0.03 * w,
        ),
        (wdjax.add_l2_gradient(0.03, masks.ALL), lambda u, w: u + 0.03 * w),
    ]:
        out = one_step(tx, u, w)["k"]
        assert out.dtype == jnp.bfloat16
        assert bits(out) == bits(rule(f32(u["k"]), f32(w["k"])).astype(jnp.bfloat16))
        native = rule(u["k"], jnp.bfloat16(0.03) * w["k"])  # what bfloat16 arithmetic would give
        assert np.any(f32(out) != f32(native))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_warns_when_the_decay_is_below_the_dtype_resolution(dtype):
    w = {"k": jnp.full((4, 4), 1.0, dtype)}
    with pytest.warns(
        RuntimeWarning, match=f"below the resolution of {jnp.dtype(dtype).name}.*at 'k'"
    ):
        tx = wdjax.decoupled_weight_decay(1e-4, masks.ALL, learning_rate=1e-3)
        state = tx.init(w)
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, w), state, w)
    assert bits(optax.apply_updates(w, out)) == bits(w)  # indeed: the decay does nothing
    with pytest.warns(RuntimeWarning, match="below the resolution"):
        wdjax.adamw(1e-3, 1e-4, mask=masks.ALL).init(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wdjax.decoupled_weight_decay(1e-1, masks.ALL, learning_rate=1e-1).init(
            w
        )  # c·λ = 1e-2: fine
        wdjax.decoupled_weight_decay(1e-4, masks.ALL, learning_rate=1e-3).init(
            {"k": jnp.ones((4, 4))}
        )  # float32


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("bad", "msg"),
    [(-1e-3, "must be >= 0"), (float("nan"), "must be finite"), ("0.1", "must be a real")],
)
def test_bad_learning_rates_raise(bad, msg):
    """Bad rates are table-driven in test_properties.py; these are the other numbers."""
    with pytest.raises(ValueError, match=f"learning_rate {msg}"):
        wdjax.l1_proximal(0.1, learning_rate=bad)
    with pytest.raises(ValueError, match=f"learning_rate {msg}"):
        wdjax.decoupled_weight_decay(0.1, learning_rate=bad)
    with pytest.raises(ValueError, match=f"learning_rate {msg}"):
        wdjax.decay_toward(P, 0.1, learning_rate=bad)
    with pytest.raises(ValueError, match=f"max_learning_rate {msg}"):
        wdjax.decoupled_weight_decay(
            0.1, learning_rate=0.1, lr_coupling="schedule", max_learning_rate=bad
        )


def test_bad_arguments_raise():
    with pytest.raises(
        ValueError,
        match=r"lr_coupling must be one of \('lr', 'schedule', 'corrected', 'constant'\), "
        "got 'linear'",
    ):
        wdjax.decoupled_weight_decay(0.1, learning_rate=0.1, lr_coupling="linear")
    sched = optax.cosine_decay_schedule(1e-3, 100)
    for coupling in ("schedule", "corrected"):
        with pytest.raises(
            ValueError, match=f"lr_coupling='{coupling}' with a schedule needs max_learning_rate="
        ):
            wdjax.decoupled_weight_decay(0.1, learning_rate=sched, lr_coupling=coupling)
    with pytest.raises(ValueError, match="lr_coupling='lr' needs learning_rate="):
        wdjax.decoupled_weight_decay(0.1)
    tx = wdjax.add_l2_gradient(0.1)
    with pytest.raises(ValueError, match=r"need the params: call update\(updates, state, params\)"):
        tx.update(U, tx.init(P))
    with pytest.raises(ValueError, match="mask pattern 'conv/\\*' matches no parameter"):
        wdjax.add_l2_gradient(0.1, "conv/*").init(P)  # at init, not at the first step
    with pytest.raises(
        ValueError, match="mask tree does not fit the params: no entry for parameter 'head/bias'"
    ):
        wdjax.max_norm(1.0, mask={"dense": True, "head": {"kernel": True}}).init(P)
    with pytest.raises(ValueError, match="l1_proximal needs learning_rate="):
        wdjax.l1_proximal(0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: wdjax.add_l2_gradient(0.1),
        lambda: wdjax.decoupled_weight_decay(0.1, learning_rate=0.1),
        lambda: wdjax.decay_toward(P, 0.1, learning_rate=0.1),
        lambda: wdjax.l1_proximal(0.1, learning_rate=0.1),
        lambda: wdjax.max_norm(1.0),
    ],
    ids=["add_l2_gradient", "decoupled", "decay_toward", "l1_proximal", "max_norm"],
)
def test_updates_that_do_not_fit_the_params_raise(make):
    tx = make()
    state = tx.init(P)
    transposed = {**U, "dense": {**U["dense"], "bias": U["dense"]["bias"][:, None]}}
    with pytest.raises(
        ValueError, match=r"an update has shape \(2, 1\) where its param has \(2,\)"
    ):
        tx.update(transposed, state, P)
    scalar = {**U, "head": {**U["head"], "kernel": jnp.float32(1.0)}}  # would broadcast
    with pytest.raises(ValueError, match=r"an update has shape \(\) where its param has \(2, 1\)"):
        tx.update(scalar, state, P)
    with pytest.raises(ValueError, match="updates do not have the structure of the params"):
        tx.update({"dense": U["dense"]}, state, P)


# -------------------------------------------------------------- equivalences


def test_sgd_l2_in_loss_equals_add_l2_gradient_equals_decoupled_lr():
    lam, lr = 0.1, 0.1
    objective = wdjax.regularized(mse, wdjax.l2(lam, masks.default()))
    in_loss = trajectory(optax.sgd(lr), lambda p, x, y: objective(p, x, y)[0])
    coupled = trajectory(optax.chain(wdjax.add_l2_gradient(lam, masks.default()), optax.sgd(lr)))
    decoupled = trajectory(
        optax.chain(
            optax.sgd(lr), wdjax.decoupled_weight_decay(lam, masks.default(), learning_rate=lr)
        )
    )
    plain = trajectory(optax.sgd(lr))
    assert max_rel_err(coupled, in_loss) < 1e-5
    assert max_rel_err(decoupled, in_loss) < 1e-5
    assert max_rel_err(plain, in_loss) > 1e-2  # the decay is not negligible here


def test_adam_l2_in_loss_differs_from_decoupled():
    lam, lr = 0.1, 1e-2
    in_loss = trajectory(
        optax.adam(lr), lambda p, x, y: mse(p, x, y) + wdjax.l2(lam, masks.default())(p)
    )
    coupled = trajectory(optax.chain(wdjax.add_l2_gradient(lam, masks.default()), optax.adam(lr)))
    decoupled = trajectory(
        optax.chain(
            optax.adam(lr), wdjax.decoupled_weight_decay(lam, masks.default(), learning_rate=lr)
        )
    )
    assert max_rel_err(coupled, in_loss) < 1e-4
    assert max_rel_err(decoupled, in_loss) > 1e-2


# ------------------------------------------------------------------ properties


def _no_tiny(x: np.ndarray) -> np.ndarray:
    """Values below 1e-6 in magnitude set to 0, so that no sum of two is subnormal
    (XLA:CPU may flush subnormals to zero, NumPy does not)."""
    return np.where(np.abs(x) < 1e-6, np.float32(0), x).astype(np.float32)


@st.composite
def weights_and_updates(draw):
    """Float32 ``(w, u)`` of one random shape; ``u`` is sometimes all zeros."""
    w = _no_tiny(draw(float_arrays()))
    u = draw(float_arrays(shape=w.shape) | st.just(np.zeros_like(w)))
    return w, _no_tiny(u)


@PROPERTY
@given(
    wu=weights_and_updates(),
    lam=st.floats(0.0, 5.0),
    eta=st.floats(1e-3, 1.0),
)
def test_l1_proximal_is_exactly_soft_thresholding(wu, lam, eta):
    w, u = wu
    out = one_step(wdjax.l1_proximal(lam, learning_rate=eta), {"w": jnp.asarray(u)},
                   {"w": jnp.asarray(w)})["w"]  # fmt: skip
    new = f32(optax.apply_updates({"w": jnp.asarray(w)}, {"w": out})["w"])
    z = w + u  # float32, as the transform computes it
    t = np.float32(eta * lam)
    below = np.abs(z) <= t
    # exact zeros wherever |w + u| <= η·λ ...
    assert np.all(new[below] == 0.0)
    # ... and elsewhere the shrunk value, sign kept: |w⁺| = |z| − η·λ
    expected = np.sign(z) * np.maximum(np.abs(z) - t, 0)
    slack = 4 * np.finfo(np.float32).eps * (np.abs(w) + np.abs(z) + t)  # w + (w⁺ − w) rounds
    assert np.all(np.abs(new - expected) <= slack)
    assert np.all((np.sign(new) == np.sign(z)) | (new == 0))
    assert np.all(new[np.abs(z) > t + slack] != 0.0)  # no zeros beyond rounding
    if lam == 0.0:
        assert bits(out) == bits(jnp.asarray(u))  # nothing moved: u itself


def _axes(ndim: int) -> st.SearchStrategy:
    single = st.integers(-ndim, ndim - 1)
    multi = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)
    return single | multi.map(tuple)


@PROPERTY
@given(wu=weights_and_updates(), c=st.floats(0.05, 5.0), data=st.data())
def test_max_norm_caps_every_norm_and_is_idempotent(wu, c, data):
    w, u = wu
    axis = data.draw(_axes(w.ndim))
    tx = wdjax.max_norm(c, axis=axis)
    params = {"w": jnp.asarray(w)}
    out = one_step(tx, {"w": jnp.asarray(u)}, params)
    new = optax.apply_updates(params, out)
    norms = np.sqrt(np.sum(f32(new["w"]) ** 2, axis=axis))
    slack = 8 * np.finfo(np.float32).eps * (c + np.abs(w).max() * np.sqrt(w.size))
    assert np.all(norms <= c + slack)
    # where the norm was within c already, the update is u itself, bit for bit
    z = w + u
    inside = np.broadcast_to(
        np.sqrt(np.sum(z * z, axis=axis, keepdims=True)) <= c * (1 - 1e-6), w.shape
    )
    np.testing.assert_array_equal(f32(out["w"])[inside], u[inside])
    # idempotent: projecting again (a zero step) changes nothing
    again = optax.apply_updates(new, one_step(tx, {"w": jnp.zeros_like(new["w"])}, new))
    chex.assert_trees_all_close(again, new, rtol=1e-6, atol=1e-7)
