"""Optax's own behaviours, run over the table of wdjax optimizers (as Optax's
`alias_test.py` runs its table), and wdjax inside other people's tools: `optax.masked`,
`optax.tree.map_params`, `nnx.Optimizer`, linen `TrainState`, Equinox masks."""

from __future__ import annotations

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import wdjax
from wdjax import masks
from wdjax.optimizers import OPTIMIZERS

NAMES = sorted(OPTIMIZERS)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def tree(dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    t = {
        "dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jnp.zeros(3)},
        "head": {"kernel": jax.random.normal(k[1], (3, 2)), "bias": jnp.ones(2)},
    }
    return jax.tree.map(lambda x: x.astype(dtype), t)


def make(name, **kw):
    return OPTIMIZERS[name](1e-2, 0.1, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_map_params_derives_a_spec_for_every_param_shaped_leaf(name):
    opt = make(name, l1=1e-3, **({"momentum": 0.9} if "sgd" in name else {}))
    state = opt.init(tree())
    spec = optax.tree.map_params(opt, lambda p: "P", state, transform_non_params=lambda x: "-")
    leaves = jax.tree.leaves(spec)
    assert "P" in leaves and "-" in leaves  # moments follow the params; counts do not
    assert all(v == "-" for v in jax.tree.leaves(spec.hyperparams))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("params", [{}, {"w": None}], ids=["empty", "none"])
def test_init_on_params_without_arrays(name, params):
    state = make(name).init(params)
    assert jax.tree.leaves(state)  # counts and hyperparameters, nothing param-shaped


@pytest.mark.parametrize("name", NAMES)
def test_init_on_abstract_params(name):
    opt = make(name)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree())
    shapes = jax.eval_shape(opt.init, abstract)
    concrete = opt.init(tree())
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_updates_keep_the_gradient_dtype_and_hyperparams_stay_float32(name, dtype):
    opt = make(name, l1=1e-3)
    params = tree(dtype)
    state = opt.init(params)
    updates, new_state = jax.jit(opt.update)(params, state, params)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(new_state.hyperparams))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64], ids=str)
def test_state_is_stable_under_lax_cond(name, dtype):
    """Optax's `test_state_shape_dtype_shard_stability`: the state after an update has
    the structure, shapes and dtypes of the state before, so `lax.cond` accepts both."""
    opt = make(name, mask=masks.ALL)
    params = jax.tree.map(lambda x: x.astype(dtype), tree())
    state = opt.init(params)

    @jax.jit
    def step(params, state, go):
        def apply(p, s):
            u, s = opt.update(p, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.cond(go, apply, lambda p, s: (p, s), params, state)

    new_params, new_state = step(params, state, True)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), state, new_state)
    assert all(jax.tree.leaves(same))
    assert all(p.dtype == jnp.dtype(dtype) for p in jax.tree.leaves(new_params))


@pytest.mark.parametrize(
    ("name", "kwargs", "leaf"),
    [
        ("adamw", {"mu_dtype": jnp.bfloat16}, "mu"),
        ("adam_l2", {"mu_dtype": jnp.bfloat16}, "mu"),
        ("lionw", {"mu_dtype": jnp.bfloat16}, "mu"),
        ("sgdw", {"momentum": 0.9, "accumulator_dtype": jnp.bfloat16}, "trace"),
        ("sgd_l2", {"momentum": 0.9, "accumulator_dtype": jnp.bfloat16}, "trace"),
    ],
)
def test_explicit_state_dtype(name, kwargs, leaf):
    state = make(name, **kwargs).init(tree())
    found = [
        x.dtype
        for path, x in jax.tree_util.tree_leaves_with_path(state)
        if any(getattr(k, "name", None) == leaf for k in path)
    ]
    assert found and set(found) == {jnp.dtype(jnp.bfloat16)}


def test_adamw_keywords_match_optax_step_for_step():
    kw = {"b1": 0.8, "b2": 0.95, "eps": 1e-6, "eps_root": 1e-9, "nesterov": True}
    ours, theirs = (
        wdjax.adamw(1e-2, 0.1, mask=masks.ALL, **kw),
        optax.adamw(1e-2, weight_decay=0.1, **kw),
    )
    params = p_ours = p_theirs = tree()
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for i in range(5):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x + i), p_ours)
        u, s_ours = ours.update(g, s_ours, p_ours)
        v, s_theirs = theirs.update(g, s_theirs, p_theirs)
        p_ours, p_theirs = optax.apply_updates(p_ours, u), optax.apply_updates(p_theirs, v)
    chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-6)


def test_update_with_none_behaves_as_optax():
    params = tree()
    ours = wdjax.decoupled_weight_decay(0.1, learning_rate=1.0)
    theirs = optax.add_decayed_weights(0.1)
    assert ours.update(None, ours.init(params), params)[0] is None
    assert theirs.update(None, theirs.init(params), params)[0] is None
    with pytest.raises(ValueError, match="need the params"):
        ours.update(params, ours.init(params), None)
    peers = {"adamw": optax.adamw, "adam_l2": optax.adam, "lionw": optax.lion}
    peers |= {"sgdw": optax.sgd, "sgd_l2": optax.sgd}
    for name, peer in peers.items():  # whole optimizers: as their Optax peer does

        def outcome(opt):
            try:
                return opt.update(None, opt.init(params), params)[0]
            except ValueError as e:
                return type(e)

        assert outcome(make(name, mask=masks.ALL)) == outcome(peer(1e-2)), name


@pytest.mark.parametrize("name", NAMES)
def test_update_accepts_extra_arguments_under_jit(name):
    opt = make(name)
    params = tree()
    state = opt.init(params)
    updates, _ = jax.jit(lambda p, s: opt.update(p, s, p, value=jnp.ones([])))(params, state)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


# ------------------------------------------------------------------ optax.masked


def test_wdjax_transform_nests_in_optax_masked_with_a_full_bool_tree():
    """Optax issue #271: an inner mask that is a full bool tree, inside optax.masked."""
    params = tree()
    outer = {"dense": {"kernel": True, "bias": False}, "head": {"kernel": True, "bias": True}}
    inner = {"dense": {"kernel": True, "bias": True}, "head": {"kernel": False, "bias": True}}
    ours = optax.masked(wdjax.decoupled_weight_decay(0.5, inner, learning_rate=1.0), outer)
    theirs = optax.masked(optax.add_decayed_weights(0.5, inner), outer)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u_ours, _ = jax.jit(ours.update)(zeros, ours.init(params), params)
    u_theirs, _ = jax.jit(theirs.update)(zeros, theirs.init(params), params)
    # decoupled decay subtracts what add_decayed_weights adds: u = −λ·w vs +λ·w
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, -b), u_ours, u_theirs)
    assert float(jnp.abs(u_ours["dense"]["kernel"]).sum()) > 0  # selected by both masks
    assert float(jnp.abs(u_ours["head"]["kernel"]).sum()) == 0  # left out by the inner mask


def test_wdjax_optimizer_inside_a_callable_optax_mask():
    params = tree()
    opt = optax.masked(wdjax.adamw(1e-2, 0.5, mask=masks.ALL), lambda p: jax.tree.map(
        lambda x: x.ndim > 1, p))  # fmt: skip
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0
    np.testing.assert_array_equal(updates["head"]["bias"], zeros["head"]["bias"])


# ---------------------------------------------------------------- complex params


def test_complex_params_are_decayed_as_optax_decays_them():
    params = {"w": jnp.array([[1 + 2j, 3 - 1j]], jnp.complex64)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    ours = wdjax.add_l2_gradient(0.5, masks.ALL)
    theirs = optax.add_decayed_weights(0.5)
    np.testing.assert_array_equal(
        ours.update(zeros, ours.init(params), params)[0]["w"],
        theirs.update(zeros, theirs.init(params), params)[0]["w"],
    )
    penalty = wdjax.l2(2.0, masks.ALL)(params)  # λ/2·Σ|w|², real
    assert penalty.dtype == jnp.float32 and float(penalty) == pytest.approx(15.0)


# -------------------------------------------------------- Equinox and Flax nnx / linen


def _eqx_model():
    return eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0))


def test_equinox_whole_model_bool_mask():
    """Equinox's recipe: a bool for every leaf of the model (functions included), then
    `eqx.tree_at`; the entries of leaves `eqx.filter` dropped are ignored."""
    model = _eqx_model()
    params = eqx.filter(model, eqx.is_array)
    mask = jax.tree.map(lambda _: False, model)
    mask = eqx.tree_at(lambda m: m.layers[-1].weight, mask, replace=True)
    opt = wdjax.adamw(1e-2, 0.5, mask=mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    moved = [float(jnp.abs(u).sum()) > 0 for u in jax.tree.leaves(updates)]
    assert moved == [False, False, True, False]  # only layers[-1].weight


def test_equinox_mask_with_a_misspelt_entry_still_raises():
    params = {"encoder": {"w": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="entry 'encodr' matches no parameter"):
        wdjax.adamw(1e-2, 0.1, mask={"encoder": True, "encodr": False}).init(params)


def test_set_hyperparams_on_nnx_optimizer_recompiles_nothing():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, wdjax.adamw(1e-2, 0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, grads)
        return loss

    x = jnp.ones((4, 3))
    step(model, opt, x)
    compiled = step.jitted_fn._cache_size()
    opt.opt_state = wdjax.set_hyperparams(opt.opt_state, weight_decay=0.5, learning_rate=1e-3)
    step(model, opt, x)
    assert step.jitted_fn._cache_size() == compiled
    assert type(opt.opt_state.hyperparams["weight_decay"]).__name__ == "OptArray"
    assert float(opt.opt_state.hyperparams["weight_decay"][...]) == 0.5


def test_set_hyperparams_rejects_a_name_the_state_does_not_hold():
    state = wdjax.adamw(1e-2).init(tree())
    with pytest.raises(KeyError, match="weight_dcay"):
        wdjax.set_hyperparams(state, weight_dcay=0.1)


def test_linen_train_state_with_a_wdjax_optimizer():
    from flax import linen

    model = linen.Dense(2)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=wdjax.adamw(1e-2, 0.5)
    )

    @jax.jit
    def step(state, x):
        grads = jax.grad(lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    state = step(step(state, jnp.ones((4, 3))), jnp.ones((4, 3)))  # step 0 is a Python int
    compiled = step._cache_size()
    state = state.replace(opt_state=wdjax.set_hyperparams(state.opt_state, weight_decay=0.0))
    state = step(state, jnp.ones((4, 3)))
    assert step._cache_size() == compiled and int(state.step) == 3


# ---------------------------------------------------- where wdjax deliberately differs


def test_a_mask_that_selects_nothing_is_an_error_not_a_silent_no_op():
    params = {"bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match="selects no floating-point parameter"):
        wdjax.adamw(1e-2, 0.1).init(params)  # the default mask decays no bias
    optax.adamw(1e-2, mask=lambda p: {"bias": False}).init(params)  # Optax: silently nothing
    wdjax.adamw(1e-2, 0.1, mask=masks.NONE).init(params)  # say so explicitly
