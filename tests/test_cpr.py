"""Constrained parameter regularization: step-by-step parity with the reference
implementation `pytorch-cpr` (AdamCPR, its multi-tensor path) over 120 steps, for each
way of setting κ; and CPR as an Optax citizen (jit, vmap, masks, bad arguments)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peers
import pytest
from helpers import BATCHES, MLP0, max_rel_err, mse

import wdjax
from wdjax import masks
from wdjax.constrained import UNSET

# pytorch-cpr's own deprecation notices from PyTorch, not wdjax's
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_compiling.*:UserWarning", "ignore:Use _accelerator_graph:DeprecationWarning"
)
STEPS, LR = 120, 0.1  # a rate at which the kernels' norms grow: CPR has work to do
# κ-setting methods, with settings that make each one act within 120 steps
INITS = {
    "inflection_point": {"reg_step_size": 10, "ema_decay": 0.9},  # found at steps 40, 60
    "uniform": {"init_value": 2.0},
    "dependent": {"init_value": 0.8},
    "warm_start": {"warm_start": 30},
}


def _torch_cpr(init: str, options: dict):
    pytest.importorskip("torch", reason="the parity test needs PyTorch")
    cpr = pytest.importorskip("pytorch_cpr", reason="pip install pytorch-cpr")
    kwargs = {
        "kappa_init_method": init,
        "kappa_init_param": options.get("init_value", options.get("warm_start", 1000)),
        "reg_step_size": options.get("reg_step_size", 200),
        "reg_ema_decay": options.get("ema_decay", 0.99),
    }

    def make(layers):
        groups = [
            {"params": [layer.weight for layer in layers], "regularize": True},
            {"params": [layer.bias for layer in layers], "regularize": False},
        ]
        return cpr.AdamCPR(groups, lr=LR, eps=1e-8, foreach=True, **kwargs)

    return make


@pytest.mark.parametrize("init", sorted(INITS))
def test_matches_pytorch_cpr_step_by_step(init):
    """Teacher-forced: each step starts both from PyTorch's params (Adam at η = 0.1 is
    chaotic, so free-running trajectories part by float32 rounding alone); the new
    params agree to 1e-5 at every step, and κ is set at the same step to the same value."""
    pytest.importorskip("torch", reason="the parity test needs PyTorch")
    options = INITS[init]
    layers = peers.torch_mlp()
    theirs = _torch_cpr(init, options)(layers)
    tx = optax.chain(optax.adam(LR, eps=1e-8), wdjax.cpr(masks.DEFAULT, init=init, **options))
    state = tx.init(MLP0)
    update = jax.jit(tx.update)
    xs, ys = (np.asarray(b) for b in BATCHES)
    worst, kappas = 0.0, []
    for t in range(STEPS):
        params = peers.jax_params(layers)
        loss = peers.torch_loss(layers, xs[t], ys[t])
        theirs.zero_grad()
        loss.backward()
        theirs.step()
        grads = jax.grad(mse)(params, xs[t], ys[t])
        updates, state = update(grads, state, params)
        ours, expected = optax.apply_updates(params, updates), peers.jax_params(layers)
        worst = max(
            worst, max_rel_err(*(jax.tree.map(lambda a: a[None], p) for p in (ours, expected)))
        )
        kappa = [float(theirs.state[layer.weight]["kappa"]) for layer in layers]
        kappas.append((kappa, [float(state[1].kappa[f"dense{i}"]["kernel"]) for i in range(3)]))
    assert worst < 1e-5
    for t, (k_theirs, k_ours) in enumerate(kappas):
        np.testing.assert_allclose(k_ours, k_theirs, rtol=1e-5, err_msg=f"κ at step {t + 1}")
    final = kappas[-1][0]
    if init in ("inflection_point", "warm_start"):  # the bound was set during the run
        assert any(k not in (UNSET, 0.0) for k in final), final


def test_inflection_point_sets_kappa_once_per_matrix():
    tx = wdjax.cpr(reg_step_size=10, ema_decay=0.9)
    params = MLP0
    state = tx.init(params)
    kappas = []
    for _ in range(STEPS):
        grads = jax.grad(lambda p: jnp.sum(p["dense0"]["kernel"] ** 2))(params)
        grads = jax.tree.map(lambda g: -0.05 * g, grads)  # growth, then the bound stops it
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        kappas.append(float(state.kappa["dense0"]["kernel"]))
    changes = [k for a, k in zip(kappas, kappas[1:], strict=False) if k != a]
    assert len(changes) <= 1  # set once (or never), never moved after
    assert float(state.kappa["dense0"]["bias"]) == UNSET  # not selected: as initialized


def test_cpr_is_jit_and_vmap_clean_and_keeps_masked_leaves():
    tx = wdjax.cpr(init="uniform", init_value=0.5)
    grads = jax.tree.map(jnp.ones_like, MLP0)

    def one(scale):
        params = jax.tree.map(lambda w: w * scale, MLP0)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    batched = jax.jit(jax.vmap(one))(jnp.array([1.0, 3.0]))
    for i, scale in enumerate((1.0, 3.0)):
        single = one(scale)
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)  # u = w⁺ − w: ulps of w
    for layer in MLP0:  # biases are not selected: their updates pass through
        np.testing.assert_array_equal(batched[layer]["bias"][0], grads[layer]["bias"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": "magic"}, "init must be one of"),
        ({"kappa_update": -1.0}, "kappa_update must be >= 0"),
        ({"reg_step_size": 0}, "reg_step_size must be an int >= 1"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"warm_start": -1}, "warm_start must be an int >= 0"),
        ({"init": "warm_start"}, "needs warm_start >= 1"),
    ],
)
def test_cpr_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        wdjax.cpr(**kwargs)


def test_cpr_needs_params_and_a_mask_that_selects():
    with pytest.raises(ValueError, match="selects no parameter"):
        wdjax.cpr(masks.NONE).init(MLP0)
    tx = wdjax.cpr()
    with pytest.raises(ValueError, match="cpr needs params"):
        tx.update(MLP0, tx.init(MLP0))
