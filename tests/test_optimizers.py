"""Tests for wdjax.optimizers: parity with Optax over a training trajectory, the
chain each optimizer stands for, λ changed and vmapped without recompiling, masks
(including callables, Optax's inject_hyperparams trap), bad input, and the
masked-out-leaves-are-untouched property."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    BATCHES,
    MLP0,
    PROPERTY,
    ZEROS,
    P,
    bits,
    f32,
    float_trees,
    max_rel_err,
    mse,
    trajectory,
)
from hypothesis import given
from hypothesis import strategies as st

import wdjax
from wdjax import masks
from wdjax.optimizers import OPTIMIZERS, create


def KERNELS(p):  # a callable mask, in Optax's style
    return jax.tree.map(lambda x: x.ndim >= 2, p)


# --------------------------------------------------------------- vs Optax


def test_adamw_matches_optax_adamw_over_a_trajectory():
    ours = trajectory(wdjax.adamw(3e-3, 0.1), steps=120)  # default mask: the MLP's kernels
    theirs = trajectory(optax.adamw(3e-3, weight_decay=0.1, mask=KERNELS), steps=120)
    assert max_rel_err(ours, theirs) < 1e-5
    no_decay = trajectory(optax.adam(3e-3), steps=120)
    assert max_rel_err(no_decay, theirs) > 1e-3  # the decay matters, so the parity means something


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            wdjax.adam_l2(1e-2, 0.1, mask=masks.ALL),
            optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-2)),
        ),
        (
            wdjax.sgd_l2(0.1, 0.1, momentum=0.9, mask=masks.ALL),
            optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)),
        ),
        (
            wdjax.sgdw(0.1, 0.1, momentum=0.9, nesterov=True),
            optax.chain(
                optax.sgd(0.1, momentum=0.9, nesterov=True),
                optax.add_decayed_weights(-0.1 * 0.1, KERNELS),
            ),
        ),
        (wdjax.lionw(1e-3, 1.0), optax.lion(1e-3, weight_decay=1.0, mask=KERNELS)),
        (
            wdjax.adamw(1e-2, 0.1, nesterov=True, mask=masks.ALL),
            optax.nadamw(1e-2, weight_decay=0.1),
        ),
    ],
    ids=["adam_l2", "sgd_l2", "sgdw", "lionw", "nadamw"],
)
def test_optimizers_are_the_documented_chains(ours, theirs):
    assert max_rel_err(trajectory(ours, steps=20), trajectory(theirs, steps=20)) < 1e-5


def test_lr_couplings_inside_the_optimizer():
    sched = optax.linear_schedule(1e-2, 1e-3, 3)
    for coupling, c in [
        ("schedule", lambda eta: eta / 2e-2),
        ("corrected", lambda eta: eta**2 / 2e-2),
        ("constant", lambda eta: 1.0),
        ("lr", lambda eta: eta),
    ]:
        tx = wdjax.sgdw(sched, 0.5, mask=masks.ALL, lr_coupling=coupling, max_learning_rate=2e-2)
        state = tx.init(P)
        for t in range(3):
            out, state = tx.update(ZEROS, state, P)  # zero gradient: the update is the decay alone
            np.testing.assert_allclose(
                out["head"]["kernel"],
                -c(float(sched(t))) * 0.5 * f32(P["head"]["kernel"]),
                rtol=1e-5,
            )


def test_l1_and_cautious_options():
    tx = wdjax.sgdw(0.5, 0.0, mask=masks.ALL, l1=2.0)  # threshold η·λ₁ = 1
    state = tx.init(P)
    assert set(state.hyperparams) == {"learning_rate", "weight_decay", "l1"}
    new = optax.apply_updates(P, tx.update(ZEROS, state, P)[0])
    for n, w in zip(jax.tree.leaves(new), jax.tree.leaves(P), strict=True):
        np.testing.assert_allclose(
            n, np.sign(f32(w)) * np.maximum(np.abs(f32(w)) - 1.0, 0), atol=1e-7
        )
    assert sum(int((f32(n) == 0.0).sum()) for n in jax.tree.leaves(new)) == 5  # exact zeros

    tx = wdjax.sgdw(0.1, 1.0, mask=masks.ALL, cautious=True)
    grads = jax.tree.map(lambda x: -jnp.ones_like(x), P)  # the step raises every weight by 0.1
    out = tx.update(grads, tx.init(P), P)[0]
    for o, w in zip(
        jax.tree.leaves(out), jax.tree.leaves(P), strict=True
    ):  # so decay only where w < 0
        np.testing.assert_allclose(o, np.where(f32(w) < 0, 0.1 - 0.1 * f32(w), 0.1), rtol=1e-6)


# ----------------------------------------------- λ without recompiling, sweeps


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_weight_decay_changes_without_recompiling(name):
    tx = create(name, 1e-2, 0.1, mask=masks.ALL)
    state0 = tx.init(MLP0)
    assert float(state0.hyperparams["weight_decay"]) == pytest.approx(0.1)
    batch = jax.tree.map(lambda b: b[0], BATCHES)

    @jax.jit
    def step(params, state, wd):
        state = optax.tree_utils.tree_set(state, weight_decay=wd)
        updates, state = tx.update(jax.grad(mse)(params, *batch), state, params)
        return optax.apply_updates(params, updates), state

    results = [step(MLP0, state0, wd)[0] for wd in (0.0, 0.1, 1.0, 0.5)]
    assert step._cache_size() == 1
    for a, b in itertools.pairwise(results):
        assert bits(a) != bits(b)
    _, state = step(MLP0, state0, 0.7)
    assert float(optax.tree_utils.tree_get(state, "weight_decay")) == pytest.approx(0.7)

    # a sweep: vmap over a batch of λ gives what each λ gives alone
    lams = jnp.array([0.0, 0.1, 1.0, 0.5])
    swept = jax.vmap(step, in_axes=(None, None, 0))(MLP0, state0, lams)[0]
    for i, alone in enumerate(results):
        for s, a in zip(jax.tree.leaves(swept), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(s[i], a, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------- masks and the trap


def test_optax_inject_hyperparams_trap_and_wdjax_callable_mask():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    # Optax: a callable mask passed through inject_hyperparams is taken for a schedule,
    # evaluated on the step count, and the decay silently does nothing.
    trap = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.5, mask=KERNELS)
    state = trap.init(params)
    assert "mask" in state.hyperparams
    updates, _ = trap.update(zero_grads, state, params)
    assert all(np.all(f32(u) == 0) for u in jax.tree.leaves(updates))  # no decay at all

    ours = wdjax.adamw(0.1, 0.5, mask=KERNELS)
    state = ours.init(params)
    assert set(state.hyperparams) == {"learning_rate", "weight_decay"}
    updates, _ = ours.update(zero_grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)  # decayed: −η·λ·w
    np.testing.assert_array_equal(updates["b"], np.zeros(2))  # not selected, not decayed
    state = optax.tree_utils.tree_set(state, weight_decay=1.0)
    np.testing.assert_allclose(
        ours.update(zero_grads, state, params)[0]["w"], -0.1 * np.ones((2, 2)), rtol=1e-6
    )


@PROPERTY
@given(data=float_trees(), name=st.sampled_from(sorted(OPTIMIZERS)), steps=st.integers(3, 10))
def test_masked_out_leaves_stay_bit_identical(data, name, steps):
    params, like = data
    leaves = jax.tree.leaves(params)
    rng = np.random.default_rng(len(leaves) + steps)
    chosen = [True] + list(rng.random(len(leaves) - 1) < 0.5)
    rng.shuffle(chosen)
    mask = jax.tree.unflatten(jax.tree.structure(params), [bool(c) for c in chosen])
    grads = jax.tree.map(lambda *g: jnp.stack(g), *[like(params) for _ in range(steps)])

    def run(params, mask):
        extra = {"momentum": 0.9} if "sgd" in name else {}
        tx = create(name, 1e-2, 0.5, mask=mask, **extra)

        def body(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.tree.leaves(jax.lax.scan(body, (params, tx.init(params)), grads)[0][0])

    decayed, undecayed = jax.jit(lambda p: (run(p, mask), run(p, masks.NONE)))(params)
    for c, a, b in zip(chosen, decayed, undecayed, strict=True):
        if c and a.dtype == jnp.float32:  # in bf16/f16, c·λ·w can round away: no claim
            assert bits(a) != bits(b)  # the decay did act on the selected leaves
        elif not c:
            assert bits(a) == bits(b)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    ("bad", "msg"), [(-1e-4, "must be >= 0"), (float("nan"), "must be finite")]
)
def test_bad_hyperparameters_raise(name, bad, msg):
    with pytest.raises(ValueError, match=f"weight_decay {msg}"):
        create(name, 1e-3, bad)
    with pytest.raises(ValueError, match=f"learning_rate {msg}"):
        create(name, bad, 1e-4)
    with pytest.raises(ValueError, match=f"l1 {msg}"):
        create(name, 1e-3, 1e-4, l1=bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="lr_coupling must be one of"):
        wdjax.adamw(1e-3, 1e-4, lr_coupling="inverse")
    with pytest.raises(
        ValueError, match="lr_coupling='schedule' with a schedule needs max_learning_rate="
    ):
        wdjax.lionw(optax.cosine_decay_schedule(1e-3, 10), 1e-4, lr_coupling="schedule")
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        wdjax.sgd_l2(0.1, 1e-4, momentum=-0.9)
    with pytest.raises(
        ValueError,
        match="unknown optimizer 'adagradw'; choose one of adamw, adam_l2, sgdw, sgd_l2, lionw",
    ):
        create("adagradw", 1e-3, 1e-4)
    with pytest.raises(ValueError, match="mask pattern 'conv\\*' matches no parameter"):
        wdjax.adamw(1e-3, 1e-4, mask="conv*").init(P)
    with pytest.raises(
        ValueError, match="mask leaves must be Python bools, got float at 'dense/bias'"
    ):
        wdjax.sgdw(1e-3, 1e-4, mask={"dense": 1.0, "head": True}).init(P)
    with pytest.raises(ValueError, match="selects no floating-point parameter"):
        wdjax.adamw(1e-3, 1e-4).init({"bias": jnp.ones((3, 1))})  # a bias, whatever its rank
