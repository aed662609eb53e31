"""Tests for wdjax.lab.models: param paths, the pure init/apply face, transforms, BN, dropout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wdjax.lab import models
from wdjax.lab.models import Model

# A few shared models keep XLA compile caches warm across tests.
CNN8 = models.cnn(input_shape=(8, 8, 1))
CNN8_BN = models.cnn(input_shape=(8, 8, 1), batch_norm=True)
MLP = models.mlp(input_shape=(6,), widths=(8,))
MLP_BN = models.mlp(input_shape=(6,), widths=(8,), batch_norm=True)
MLP_DROP = models.mlp(input_shape=(6,), widths=(8,), dropout=0.5)

CNN_BASE = {
    "conv1/kernel": (3, 3, 1, 32),
    "conv1/bias": (32,),
    "conv2/kernel": (3, 3, 32, 64),
    "conv2/bias": (64,),
    "dense1/bias": (64,),
    "head/kernel": (64, 10),
    "head/bias": (10,),
}


def _paths(tree: dict) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _shapes(model: Model) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    params, model_state = jax.eval_shape(model.init, jax.random.key(0))
    return _paths(params), _paths(model_state)


@functools.cache
def _init(model: Model) -> tuple[dict, dict]:
    return model.init(jax.random.key(0))


def _batch(model: Model, n: int = 4) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (n, *model.input_shape))


def _assert_trees_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("side, flat", [(28, 7 * 7 * 64), (8, 2 * 2 * 64)])
def test_default_cnn_param_paths(side: int, flat: int) -> None:
    params, model_state = _shapes(models.cnn(input_shape=(side, side, 1)))
    assert params == {**CNN_BASE, "dense1/kernel": (flat, 64)}
    assert model_state == {}


def test_mlp_param_paths() -> None:
    assert _shapes(models.mlp(input_shape=(28, 28, 1))) == (
        {
            "dense0/kernel": (784, 256),
            "dense0/bias": (256,),
            "dense1/kernel": (256, 256),
            "dense1/bias": (256,),
            "head/kernel": (256, 10),
            "head/bias": (10,),
        },
        {},
    )
    assert _shapes(models.mlp(input_shape=(8, 8), num_classes=3, widths=(32, 16, 5)))[0] == {
        "dense0/kernel": (64, 32),
        "dense0/bias": (32,),
        "dense1/kernel": (32, 16),
        "dense1/bias": (16,),
        "dense2/kernel": (16, 5),
        "dense2/bias": (5,),
        "head/kernel": (5, 3),
        "head/bias": (3,),
    }


def test_batch_norm_stats_are_model_state_not_params() -> None:
    assert _shapes(CNN8_BN) == (
        {
            **CNN_BASE,
            "dense1/kernel": (256, 64),
            "norm1/scale": (32,),
            "norm1/bias": (32,),
            "norm2/scale": (64,),
            "norm2/bias": (64,),
        },
        {"norm1/mean": (32,), "norm1/var": (32,), "norm2/mean": (64,), "norm2/var": (64,)},
    )
    assert _shapes(MLP_BN) == (
        {
            "dense0/kernel": (6, 8),
            "dense0/bias": (8,),
            "norm0/scale": (8,),
            "norm0/bias": (8,),
            "head/kernel": (8, 10),
            "head/bias": (10,),
        },
        {"norm0/mean": (8,), "norm0/var": (8,)},
    )


@pytest.mark.parametrize("model", [CNN8, MLP, MLP_BN], ids=["cnn8", "mlp", "mlp-bn"])
def test_logits_shape_and_dtype(model: Model) -> None:
    params, model_state = _init(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((params, model_state)))
    x = jnp.ones((5, *model.input_shape), jnp.uint8)
    logits, new_state = model.apply(params, model_state, x, train=False)
    assert logits.shape == (5, 10)
    assert logits.dtype == jnp.float32
    assert new_state is model_state


def test_cnn_non_square_rgb() -> None:
    model = models.cnn(input_shape=(12, 10, 3), num_classes=4, channels=(8,), dense=16)
    params, _ = _shapes(model)
    assert params["conv1/kernel"] == (3, 3, 3, 8)
    assert params["dense1/kernel"] == (6 * 5 * 8, 16)
    logits, _ = jax.eval_shape(
        lambda p, x: model.apply(p, {}, x, train=False),
        jax.eval_shape(model.init, jax.random.key(0))[0],
        jax.ShapeDtypeStruct((2, 12, 10, 3), jnp.float32),
    )
    assert logits.shape == (2, 4)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu"])
def test_activations(activation: str) -> None:
    model = models.mlp(input_shape=(6,), widths=(8,), activation=activation)
    params, model_state = _init(MLP)  # same tree as `model`; the activation has no params
    logits, _ = model.apply(params, model_state, _batch(model), train=True)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_init_is_deterministic_with_lecun_kernels_and_zero_biases() -> None:
    a, _ = CNN8.init(jax.random.key(3))
    b, _ = CNN8.init(jax.random.key(3))
    c, _ = CNN8.init(jax.random.key(4))
    _assert_trees_equal(a, b)
    assert not np.array_equal(a["conv1"]["kernel"], c["conv1"]["kernel"])
    for layer in a.values():
        np.testing.assert_array_equal(layer["bias"], 0.0)
    # lecun_normal: std ~ 1/sqrt(fan_in), fan_in = 3*3*32 for conv2.
    assert abs(float(a["conv2"]["kernel"].std()) * np.sqrt(288) - 1.0) < 0.1


def test_jit_matches_eager() -> None:
    params, model_state = _init(CNN8_BN)
    x = _batch(CNN8_BN)
    for train in (False, True):
        eager = CNN8_BN.apply(params, model_state, x, train=train)
        jitted = jax.jit(lambda p, s, x, t=train: CNN8_BN.apply(p, s, x, train=t))(
            params, model_state, x
        )
        for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-5)


def test_model_is_a_valid_static_argument() -> None:
    same = models.create("mlp", input_shape=(6,), widths=[8])
    assert same == MLP and hash(same) == hash(MLP)
    assert MLP != MLP_BN

    @jax.jit(static_argnums=0)
    def predict(model: Model, params: dict, x: jax.Array) -> jax.Array:
        return model.apply(params, {}, x, train=False)[0]

    params, _ = _init(MLP)
    x = _batch(MLP)
    np.testing.assert_allclose(
        predict(same, params, x), MLP.apply(params, {}, x, train=False)[0], rtol=1e-5, atol=1e-6
    )


def test_grad_wrt_params() -> None:
    params, model_state = _init(CNN8)
    x, y = _batch(CNN8), jnp.arange(4)

    def loss(p: dict) -> jax.Array:
        logits, _ = CNN8.apply(p, model_state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(grads["conv1"]["kernel"]).sum()) > 0


def test_vmap_over_stacked_params() -> None:
    keys = jax.random.split(jax.random.key(0), 2)
    singles = [MLP_BN.init(k) for k in keys]
    stacked, stacked_state = jax.tree.map(lambda *xs: jnp.stack(xs), *singles)
    x = _batch(MLP_BN)

    @jax.jit
    def sweep(params: dict, model_state: dict) -> tuple[jax.Array, dict]:
        return jax.vmap(lambda p, s: MLP_BN.apply(p, s, x, train=True))(params, model_state)

    out, new_state = sweep(stacked, stacked_state)
    assert out.shape == (2, 4, 10)
    for i, (p, s) in enumerate(singles):
        ref, ref_state = MLP_BN.apply(p, s, x, train=True)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            new_state["norm0"]["mean"][i], ref_state["norm0"]["mean"], rtol=1e-5, atol=1e-6
        )
    # Vmapped init gives the same stacked params as separate inits.
    vmapped, _ = jax.jit(jax.vmap(MLP_BN.init))(keys)
    for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_batch_norm_stats_update_only_in_train() -> None:
    params, model_state = _init(CNN8_BN)
    x = _batch(CNN8_BN) + 3.0
    _, eval_state = CNN8_BN.apply(params, model_state, x, train=False)
    _assert_trees_equal(eval_state, model_state)
    _, train_state = CNN8_BN.apply(params, model_state, x, train=True)
    assert jax.tree.structure(train_state) == jax.tree.structure(model_state)
    for new, old in zip(jax.tree.leaves(train_state), jax.tree.leaves(model_state), strict=True):
        assert not np.allclose(new, old)
    # Eval normalizes with the running stats, so new stats give new logits.
    a, _ = CNN8_BN.apply(params, model_state, x, train=False)
    b, _ = CNN8_BN.apply(params, train_state, x, train=False)
    assert not np.allclose(a, b)


def test_dropout() -> None:
    params, model_state = _init(MLP_DROP)
    assert model_state == {}
    x = _batch(MLP_DROP)
    a, _ = MLP_DROP.apply(params, model_state, x, train=True, rng=jax.random.key(1))
    a2, _ = MLP_DROP.apply(params, model_state, x, train=True, rng=jax.random.key(1))
    b, _ = MLP_DROP.apply(params, model_state, x, train=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, b)
    e1, _ = MLP_DROP.apply(params, model_state, x, train=False)
    e2, _ = MLP_DROP.apply(params, model_state, x, train=False, rng=jax.random.key(5))
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(ValueError, match=r"mlp has dropout=0.5: apply\(train=True\) needs rng"):
        MLP_DROP.apply(params, model_state, x, train=True)


def test_cnn_dropout() -> None:
    model = models.cnn(input_shape=(8, 8, 1), dropout=0.5)
    assert model.init(jax.random.key(0))[1] == {}
    params, _ = _init(CNN8)
    x = _batch(model)
    a, _ = model.apply(params, {}, x, train=True, rng=jax.random.key(1))
    b, _ = model.apply(params, {}, x, train=True, rng=jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        model.apply(params, {}, x, train=False)[0], CNN8.apply(params, {}, x, train=False)[0]
    )


def test_no_rng_needed_without_dropout() -> None:
    params, model_state = _init(MLP)
    a, _ = MLP.apply(params, model_state, _batch(MLP), train=True)
    b, _ = MLP.apply(params, model_state, _batch(MLP), train=False)
    np.testing.assert_array_equal(a, b)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; valid: mlp, cnn"):
        models.create("resnet", input_shape=(8, 8, 1))
    with pytest.raises(
        ValueError, match=r"unknown activation 'swish'; valid: relu, gelu, tanh, silu"
    ):
        models.mlp(input_shape=(4,), activation="swish")
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        models.create("mlp", input_shape=(4,), activation="swish")
    with pytest.raises(
        ValueError,
        match=r"unknown config for mlp: \['channels'\]; valid: widths, activation, dropout, "
        r"batch_norm",
    ):
        models.create("mlp", input_shape=(4,), channels=(8,))
    with pytest.raises(ValueError, match=r"unknown config for cnn: \['depth'\]"):
        models.create("cnn", input_shape=(8, 8, 1), depth=3)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        models.mlp(input_shape=(4,), dropout=1.0)
    with pytest.raises(ValueError, match=r"cnn needs input_shape \(height, width, channels\)"):
        models.cnn(input_shape=(8, 8))
    with pytest.raises(ValueError, match=r"too small for 2 2x2 max-pools"):
        models.cnn(input_shape=(3, 3, 1))


def test_apply_rejects_mismatched_inputs() -> None:
    params, model_state = _init(MLP)
    x = _batch(MLP)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, \*\(6,\)\)"):
        MLP.apply(params, model_state, jnp.ones((2, 5)), train=False)
    bad = {k: v for k, v in params.items() if k != "head"}
    with pytest.raises(
        ValueError, match=r"missing \['head/bias', 'head/kernel'\], unexpected \[\]"
    ):
        MLP.apply(bad, model_state, x, train=False)
    wrong = {**params, "head": {**params["head"], "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"params head/bias has shape \(3,\), expected \(10,\)"):
        MLP.apply(wrong, model_state, x, train=False)
    with pytest.raises(ValueError, match=r"model_state do not match the model: missing \["):
        MLP_BN.apply(_init(MLP_BN)[0], {}, x, train=False)


def test_mlp_overfits_random_points() -> None:
    model = models.mlp(input_shape=(16,))
    params, model_state = model.init(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (64, 16))
    y = jax.random.randint(ky, (64,), 0, 10)
    opt = optax.adam(1e-3)

    def loss(p: dict) -> jax.Array:
        logits, _ = model.apply(p, model_state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry: tuple, _: None) -> tuple[tuple, jax.Array]:
        p, o = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, o = opt.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), value

    (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=200))(
        params
    )
    logits, _ = model.apply(params, model_state, x, train=False)
    assert float(losses[-1]) < 0.1 * float(losses[0])
    assert float(jnp.mean(jnp.argmax(logits, -1) == y)) == 1.0
