"""Step-by-step parity with Keras 3 (JAX backend) for the Keras rows of the README table
"Which weight decay do I want?": ``kernel_regularizer=L2(k)`` (and ``L1L2``), the
``weight_decay=`` of ``AdamW`` and ``SGD`` (with ``exclude_from_weight_decay``), and
``kernel_constraint=MaxNorm``.

A two-layer Dense model and a small params dict with the same initial weights are trained on
the same batches. Two drivers:

* ``apply``: each step, one gradient is computed with ``jax.grad`` at wdjax's params and fed
  to both Keras (``optimizer.apply(grads, variables)``) and the wdjax transform, so only the
  update rules differ;
* ``fit``: Keras runs its own compiled ``train_on_batch`` (its loss, its regularizer losses,
  its gradients), wdjax its own loss and gradients; for penalties, the loss values returned
  by ``train_on_batch`` are compared too.

Kernel and bias are compared after every step (relative error 1e-5: float32 rounding)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

if "keras" not in sys.modules:  # the backend is read once, when keras is first imported
    os.environ["KERAS_BACKEND"] = "jax"
keras = pytest.importorskip(
    "keras", reason="Keras 3 is needed for the Keras parity tests (pip install keras)"
)
if keras.backend.backend() != "jax":
    pytest.skip(
        f"keras was imported with the {keras.backend.backend()!r} backend before this module "
        "could set KERAS_BACKEND=jax",
        allow_module_level=True,
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from helpers import BATCHES, init_mlp, max_rel_err, mse  # noqa: E402

import wdjax  # noqa: E402
from wdjax import masks  # noqa: E402

STEPS = 25
LR, WD, MOMENTUM = 0.05, 0.1, 0.9
K, A = 0.01, 0.003  # Keras L2(K) and L1L2(l1=A, l2=K)
MAX_NORM = 0.7  # some of the first kernel's columns reach it, some stay under
# Keras Adam adds ε to √v, which has no bias correction (ε/√(1 − β₂ᵗ) added to √v̂ in optax's
# terms), optax adds it to √v̂: the two agree only as ε → 0. With ε = 1e-12, ε/√(1 − β₂ᵗ) is
# at most 3e-11, far below float32 rounding of √v̂, and the comparison is as exact as SGD's.
EPS = 1e-12
# Float32 rounding is all that differs. MaxNorm: Keras scales every column by
# min(n, c)/(n + 1e-7), so even columns under the limit shrink by 1e-7/n per step, and columns
# at the limit end at c·n/(n + 1e-7); over 25 steps, with n ≥ ~0.5, that is < 5e-6 relative,
# inside the same 1e-5.
RTOL = 1e-5

P0 = init_mlp(0, sizes=(4, 8, 3))  # {"dense0": {"kernel": (4, 8), "bias": (8,)}, "dense1": ...}
LAYERS = tuple(P0)


@dataclasses.dataclass(frozen=True)
class Row:
    """One Keras setting and its wdjax equivalent."""

    keras_optimizer: Callable[[], Any]
    wdjax_optimizer: Callable[[], optax.GradientTransformation]
    layer_kwargs: Callable[[], dict] = dict  # kernel_regularizer=..., kernel_constraint=...
    penalty: Callable[[], Any] | None = None  # a wdjax penalty
    drivers: tuple[str, ...] = ("apply", "fit")


def excluding_bias(optimizer: Any) -> Any:
    optimizer.exclude_from_weight_decay(var_names=["bias"])  # before the optimizer is built
    return optimizer


ROWS = {
    "L2(k) regularizer = l2(2k)": Row(
        lambda: keras.optimizers.SGD(LR),
        lambda: optax.sgd(LR),
        lambda: {"kernel_regularizer": keras.regularizers.L2(K)},
        penalty=lambda: wdjax.l2(2 * K, "*/kernel"),
        drivers=("fit",),  # the penalty is part of Keras's loss: only train_on_batch sees it
    ),
    "L1L2(a, k) regularizer = elastic_net(a, 2k)": Row(
        lambda: keras.optimizers.SGD(LR),
        lambda: optax.sgd(LR),
        lambda: {"kernel_regularizer": keras.regularizers.L1L2(l1=A, l2=K)},
        penalty=lambda: wdjax.elastic_net(A, 2 * K, "*/kernel"),
        drivers=("fit",),
    ),
    "AdamW(weight_decay) = adamw(mask=ALL)": Row(
        lambda: keras.optimizers.AdamW(LR, weight_decay=WD, epsilon=EPS),
        lambda: wdjax.adamw(LR, WD, eps=EPS, mask=masks.ALL),
    ),
    "AdamW(weight_decay) excluding bias = adamw(mask='*/kernel')": Row(
        lambda: excluding_bias(keras.optimizers.AdamW(LR, weight_decay=WD, epsilon=EPS)),
        lambda: wdjax.adamw(LR, WD, eps=EPS, mask="*/kernel"),
    ),
    # Keras: v ← μv − η·g, w ← w + v; optax.trace: t ← μt + g, u = −η·t. With a constant η,
    # v = −η·t at every step, so the two momentum forms are the same update.
    "SGD(momentum, weight_decay) = sgdw(momentum, mask=ALL)": Row(
        lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM, weight_decay=WD),
        lambda: wdjax.sgdw(LR, WD, momentum=MOMENTUM, mask=masks.ALL),
    ),
    "MaxNorm(c, axis=0) constraint = max_norm(c, axis=0)": Row(
        lambda: keras.optimizers.SGD(LR),
        lambda: optax.chain(optax.sgd(LR), wdjax.max_norm(MAX_NORM, "*/kernel", axis=0)),
        lambda: {"kernel_constraint": keras.constraints.MaxNorm(MAX_NORM, axis=0)},
    ),
}
CASES = [(row, driver) for row, r in ROWS.items() for driver in r.drivers]


def keras_model(row: Row, optimizer: Any) -> Any:
    """``P0`` as a Keras model: Dense(8, tanh) → Dense(3), compiled with MSE."""
    model = keras.Sequential(
        [keras.Input((4,))]
        + [
            keras.layers.Dense(
                P0[name]["bias"].shape[0],
                activation="tanh" if i < len(LAYERS) - 1 else None,
                name=name,
                **row.layer_kwargs(),
            )
            for i, name in enumerate(LAYERS)
        ]
    )
    for name in LAYERS:
        model.get_layer(name).set_weights([np.asarray(P0[name][k]) for k in ("kernel", "bias")])
    model.compile(optimizer=optimizer, loss="mse")  # Keras's "mse" here = helpers.mse
    return model


def weights(model: Any) -> dict:
    return {
        name: {k: np.array(getattr(model.get_layer(name), k).value) for k in ("kernel", "bias")}
        for name in LAYERS
    }


def run(row: Row, driver: str) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """(Keras params, wdjax params, Keras losses, wdjax losses), params after each step
    stacked on axis 0; losses at the params before each step, penalty included."""
    optimizer = row.keras_optimizer()
    model = keras_model(row, optimizer)
    loss = mse if row.penalty is None else wdjax.regularized(mse, row.penalty())
    value = loss if row.penalty is None else (lambda p, x, y: loss(p, x, y)[0])
    tx = row.wdjax_optimizer()

    @jax.jit
    def step(params, state, x, y):
        total, grads = jax.value_and_grad(value)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads, total

    params, state = P0, tx.init(P0)
    variables = [getattr(model.get_layer(n), k) for n in LAYERS for k in ("kernel", "bias")]
    theirs, ours, their_loss, our_loss = [], [], [], []
    for t in range(STEPS):
        x, y = BATCHES[0][t], BATCHES[1][t]
        params, state, grads, total = step(params, state, x, y)
        if driver == "apply":  # the same gradients into Keras's update rule
            optimizer.apply([grads[n][k] for n in LAYERS for k in ("kernel", "bias")], variables)
        else:  # Keras's own loss, gradients and compiled step
            their_loss.append(model.train_on_batch(np.asarray(x), np.asarray(y)))
        our_loss.append(total)
        theirs.append(weights(model))
        ours.append(params)
    stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)  # noqa: E731
    return stack(theirs), stack(ours), np.array(their_loss), np.array(our_loss)


@pytest.mark.parametrize(("row", "driver"), CASES)
def test_keras_matches_wdjax_step_by_step(row: str, driver: str) -> None:
    theirs, ours, their_loss, our_loss = run(ROWS[row], driver)
    assert max_rel_err(ours, theirs) < RTOL
    if driver == "fit":
        np.testing.assert_allclose(their_loss, our_loss, rtol=RTOL)
    if ROWS[row].penalty is not None:
        # the penalty matters: the same run without it is far off
        no_penalty = dataclasses.replace(ROWS[row], layer_kwargs=dict, penalty=None)
        assert max_rel_err(run(no_penalty, driver)[1], theirs) > 100 * RTOL


def test_keras_max_norm_row_is_active() -> None:
    """The MaxNorm comparison projects: after some steps some kernel columns sit at the limit,
    others stay under it."""
    row = ROWS["MaxNorm(c, axis=0) constraint = max_norm(c, axis=0)"]
    theirs, ours, _, _ = run(row, "apply")
    norms = np.linalg.norm(ours["dense0"]["kernel"], axis=1)  # (steps, columns)
    assert np.any(np.isclose(norms, MAX_NORM, rtol=1e-6)) and np.any(norms < 0.9 * MAX_NORM)
    # without the projection the run is far off
    plain = dataclasses.replace(row, wdjax_optimizer=lambda: optax.sgd(LR))
    assert max_rel_err(run(plain, "apply")[1], theirs) > 100 * RTOL


def test_keras_adam_epsilon_is_not_bias_corrected() -> None:
    """Why the AdamW rows use ε = 1e-12: at Keras's default ε = 1e-7 the same ε on both sides
    gives different updates (Keras adds ε to √v, optax to √v̂ = √v/√(1 − β₂ᵗ)), here about
    1e-3 relative after 25 steps; as ε → 0 the two become the same update."""

    def row(eps: float) -> Row:
        return Row(
            lambda: keras.optimizers.AdamW(LR, weight_decay=WD, epsilon=eps),
            lambda: wdjax.adamw(LR, WD, eps=eps, mask=masks.ALL),
        )

    theirs, ours, _, _ = run(row(1e-7), "apply")
    assert max_rel_err(ours, theirs) > 10 * RTOL


def test_keras_weight_decay_decays_bias_by_default() -> None:
    """Keras 3 decays every variable given ``weight_decay``, biases included: the table's
    ``mask=masks.ALL``; the default wdjax mask (kernels only) is not Keras's behaviour."""
    row = dataclasses.replace(
        ROWS["AdamW(weight_decay) = adamw(mask=ALL)"],
        wdjax_optimizer=lambda: wdjax.adamw(LR, WD, eps=EPS, mask="*/kernel"),
    )
    theirs, ours, _, _ = run(row, "apply")
    assert max_rel_err(ours["dense0"]["kernel"], theirs["dense0"]["kernel"]) < RTOL
    assert max_rel_err(ours["dense0"]["bias"], theirs["dense0"]["bias"]) > 100 * RTOL


def test_keras_sgd_momentum_differs_under_a_schedule() -> None:
    """Why the SGD row says "for a constant η": with a decaying schedule Keras's momentum
    carries past steps' η (v = μv − η_t·g), optax's ``trace`` multiplies all of it by the
    current η_t (u = −η_t·(μt + g)). Without momentum the two agree under the schedule."""

    def row(momentum: float) -> Row:
        keras_lr = keras.optimizers.schedules.ExponentialDecay(LR, 1, 0.9)
        return Row(
            lambda: keras.optimizers.SGD(keras_lr, momentum=momentum, weight_decay=WD),
            lambda: wdjax.sgdw(
                optax.exponential_decay(LR, 1, 0.9), WD, momentum=momentum, mask=masks.ALL
            ),
        )

    theirs, ours, _, _ = run(row(0.0), "apply")
    assert max_rel_err(ours, theirs) < RTOL
    theirs, ours, _, _ = run(row(MOMENTUM), "apply")
    assert max_rel_err(ours, theirs) > 100 * RTOL


def test_keras_l2_is_k_sum_of_squares() -> None:
    """Keras ``L2(k)(w) = k·Σw²`` (no ½), which is ``wdjax.l2(2k)``'s ``2k/2·Σw²``."""
    w = jnp.asarray(P0["dense0"]["kernel"])
    keras_value = float(keras.regularizers.L2(K)(w))
    np.testing.assert_allclose(keras_value, float(K * jnp.sum(w**2)), rtol=RTOL)
    np.testing.assert_allclose(keras_value, float(wdjax.l2(2 * K)({"w": w})), rtol=RTOL)
