"""wdjax under ``jax.sharding``: on a 2x4 mesh of the eight CPU devices conftest.py asks
for, transforms and optimizers keep the params' and their state's ``NamedSharding`` and
give what they give unsharded. Skipped, saying why, when JAX has fewer CPU devices."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import like, randomize
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

import wdjax
from wdjax import masks

PARAMS = randomize(
    {
        "dense": {"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros(32)},
        "head": {"kernel": jnp.zeros((32, 8)), "bias": jnp.zeros(8)},
    }
)
SPECS = {
    "dense": {"kernel": PS("data", "model"), "bias": PS("model")},
    "head": {"kernel": PS("model", None), "bias": PS()},  # the last one replicated
}
GRADS = like(PARAMS, scale=0.1)
ANCHOR = randomize(PARAMS, seed=5)
SCHED = optax.linear_schedule(0.1, 0.01, 5)

CASES = {
    "adamw-l1-then-max_norm": lambda anchor: optax.chain(
        wdjax.adamw(1e-2, 0.1, l1=1e-3), wdjax.max_norm(3.0)
    ),
    "adam_l2": lambda anchor: wdjax.adam_l2(1e-2, 0.1, mask=masks.ALL),
    "sgdw-cautious-schedule": lambda anchor: wdjax.sgdw(
        SCHED, 0.1, momentum=0.9, cautious=True, lr_coupling="schedule", max_learning_rate=0.1
    ),
    "sgd_l2": lambda anchor: wdjax.sgd_l2(0.1, 0.1, momentum=0.9),
    "lionw-l1": lambda anchor: wdjax.lionw(1e-3, 1.0, l1=1e-3),
    "add_l2_gradient-adam": lambda anchor: optax.chain(
        wdjax.add_l2_gradient(wdjax.rates({"head/*": 0.2}, default=0.1), masks.ALL),
        optax.adam(1e-2),
    ),
    "decay_toward": lambda anchor: optax.chain(
        optax.sgd(0.1), wdjax.decay_toward(anchor, 0.5, masks.default(), learning_rate=0.1)
    ),
    "l1_proximal-max_norm-axis1": lambda anchor: optax.chain(
        optax.sgd(0.1),
        wdjax.l1_proximal(0.5, learning_rate=0.1),
        wdjax.max_norm(0.5, "*/kernel", axis=1),
    ),
}


def _shard(tree, mesh):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, SPECS)


def _run(tx, params, grads, steps: int = 3):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


SHAPES = {p: x.shape for p, x in masks.leaves_with_paths(PARAMS)}
SPEC_OF = dict(zip([p for p, _ in masks.leaves_with_paths(PARAMS)], jax.tree.leaves(SPECS)))


def _assert_sharded_like_params(tree, mesh, what: str) -> int:
    """Every leaf of ``tree`` whose path ends with a param's path and has its shape (the
    params themselves, moments, anchors) is sharded like that param; how many there are."""
    n = 0
    for path, x in masks.leaves_with_paths(tree):
        for p, spec in SPEC_OF.items():
            if (path == p or path.endswith("/" + p)) and x.shape == SHAPES[p]:
                expected = NamedSharding(mesh, spec)
                assert x.sharding.is_equivalent_to(expected, x.ndim), (what, path, x.sharding)
                n += 1
    return n


@pytest.mark.parametrize("case", sorted(CASES))
def test_keeps_named_sharding_and_matches_unsharded(case, mesh):
    sharded_params, sharded_grads = _shard(PARAMS, mesh), _shard(GRADS, mesh)
    sharded_tx = CASES[case](_shard(ANCHOR, mesh))
    params, state = _run(sharded_tx, sharded_params, sharded_grads)
    ref_params, ref_state = _run(CASES[case](ANCHOR), PARAMS, GRADS)

    assert _assert_sharded_like_params(params, mesh, "params") == len(SPEC_OF)
    stateless = case.startswith(("sgd_l2", "l1_proximal"))  # momentum is checked, not these
    assert _assert_sharded_like_params(state, mesh, "state") >= (0 if stateless else len(SPEC_OF))
    chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state, ref_state, rtol=1e-5, atol=1e-6)
    assert any(
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS), strict=True)
    )


def test_the_anchor_keeps_its_sharding_under_jit_init(mesh):
    """The anchor of ``decay_toward`` lives in the state: ``jit(init)`` keeps it sharded
    (it is a constant of the init function, so it would otherwise land on one device)."""
    tx = wdjax.decay_toward(_shard(ANCHOR, mesh), 0.1, learning_rate=0.1)
    for state in (tx.init(_shard(PARAMS, mesh)), jax.jit(tx.init)(_shard(PARAMS, mesh))):
        _assert_sharded_like_params(state.anchor, mesh, "anchor")
        chex.assert_trees_all_equal(state.anchor, ANCHOR)


def test_sweeping_the_rate_over_a_sharded_model(mesh):
    """``vmap`` over λ with sharded params: each λ gives what it gives alone."""
    sharded = _shard(PARAMS, mesh)
    lams = jnp.array([0.0, 0.1, 1.0])

    @jax.jit
    def one(lam, params):
        tx = wdjax.adamw(1e-2, lam, mask=masks.ALL)
        updates, _ = tx.update(GRADS, tx.init(params), params)
        return optax.apply_updates(params, updates)

    swept = jax.vmap(one, in_axes=(0, None))(lams, sharded)
    for i, lam in enumerate(lams):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], swept), one(lam, PARAMS), rtol=1e-6, atol=1e-7
        )
