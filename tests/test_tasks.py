"""Your own model through the lab: Equinox and Flax nnx modules with their own losses,
trained by ``fit`` and swept (λ × folds) by ``wdjax.sweep``; one evaluation routine."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wdjax
from wdjax.lab import data, tasks, train
from wdjax.lab.folds import kfold_rows

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


def _flat(ds: data.Dataset) -> dict[str, np.ndarray]:
    """Train + val of digits as flat vectors: one pool for cross-validation."""
    x = np.concatenate([ds.x_train, ds.x_val]).reshape(-1, 64)
    return {"x": x, "y": np.concatenate([ds.y_train, ds.y_val])}


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def equinox_task() -> tasks.Task:
    """An Equinox MLP: params are the module's arrays, the rest is static."""
    static = eqx.filter(eqx.nn.MLP(64, 10, 32, 1, key=jax.random.PRNGKey(0)), eqx.is_array, True)

    def init(key):
        return eqx.filter(eqx.nn.MLP(64, 10, 32, 1, key=key), eqx.is_array)

    def logits(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    def loss(params, batch):
        out = logits(params, batch["x"])
        return _cross_entropy(out, batch["y"]).mean(), {"accuracy": _accuracy(out, batch["y"])}

    def metrics(params, batch):
        out = logits(params, batch["x"])
        hits = (jnp.argmax(out, -1) == batch["y"]).astype(jnp.float32)
        return {"loss": _cross_entropy(out, batch["y"]), "accuracy": hits}

    return tasks.task(init, loss, metrics=metrics, name="eqx-mlp")


def _accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == y)


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def nnx_task() -> tasks.Task:
    """A Flax nnx module: params are its ``nnx.State``, merged with the graphdef."""
    graphdef, _ = nnx.split(_NnxMLP(nnx.Rngs(0)))

    def loss(params, batch):
        out = nnx.merge(graphdef, params)(batch["x"])
        return _cross_entropy(out, batch["y"]).mean()

    return tasks.task(lambda key: nnx.split(_NnxMLP(nnx.Rngs(key)))[1], loss, name="nnx-mlp")


@pytest.fixture(scope="module")
def eqx_cv(digits):
    """An Equinox model of the user's own, 2 λ × 3 folds, in one program."""
    return wdjax.sweep(
        _flat(digits), model=equinox_task(), optimizer=wdjax.adamw(3e-3),
        weight_decay=[0.0, 0.3], folds=3, epochs=2, batch_size=128, progress=False,
    )  # fmt: skip


def test_user_equinox_model_is_swept_with_its_own_metrics(eqx_cv):
    assert eqx_cv.config["model"] == "eqx-mlp" and eqx_cv.config["metric"] == "accuracy"
    assert [(m["weight_decay"], m["fold"]) for m in eqx_cv.members] == [
        (wd, f) for wd in (0.0, 0.3) for f in range(3)
    ]
    assert all(s["val_accuracy_mean"] > 0.5 for s in eqx_cv.settings)  # it learns
    weights = [s["weight_norm_mean"] for s in eqx_cv.settings]
    assert weights[1] < weights[0]  # λ = 0.3 shrinks the (decayed) weights
    leaves = jax.tree.leaves(eqx_cv.params)
    assert all(leaf.shape[0] == 6 for leaf in leaves)  # stacked over members


def test_user_equinox_member_equals_fit_on_its_fold(digits, eqx_cv):
    pool = _flat(digits)
    rows, held = kfold_rows(pool["y"], 3)
    fold = 1
    train_split = {k: v[rows[fold]] for k, v in pool.items()}
    val_split = {k: v[held[fold]] for k, v in pool.items()}
    ref = train.fit(
        equinox_task(), wdjax.adamw(3e-3, 0.3), (train_split, val_split),
        epochs=2, batch_size=128, progress=False,
    )  # fmt: skip
    i = 3 + fold  # λ = 0.3, fold 1
    member = jax.tree.map(lambda a: a[i], eqx_cv.params)
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(ref.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    assert eqx_cv.members[i]["val_accuracy"] == pytest.approx(
        ref.history[-1]["val_accuracy"], abs=1e-6
    )


def test_user_nnx_model_sweeps_over_nnx_state(digits):
    ds = digits
    split = ({"x": ds.x_train.reshape(-1, 64), "y": ds.y_train},)
    split += ({"x": ds.x_val.reshape(-1, 64), "y": ds.y_val},)
    result = wdjax.sweep(
        split, model=nnx_task(), optimizer=wdjax.sgdw(0.1, momentum=0.9),
        weight_decay=[0.0, 1e-2], learning_rate=[0.05, 0.1], epochs=2, progress=False,
    )  # fmt: skip
    assert result.config["metric"] == "loss" and not result.config["maximize"]
    chosen = result.chosen
    assert chosen["val_loss_mean"] == min(s["val_loss_mean"] for s in result.settings)
    assert all(
        np.isfinite(s["val_loss_mean"]) and s["val_loss_mean"] < 2.0  # chance: ln 10 = 2.30
        for s in result.settings
    )
    assert isinstance(result.params, nnx.State)  # the user's own params type, stacked


def test_loss_with_rng_gets_a_fresh_key_each_step():
    seen = []

    def loss(params, batch, rng):
        noise = jax.random.normal(rng, batch["x"].shape)
        jax.debug.callback(lambda k: seen.append(np.asarray(k)), jax.random.key_data(rng))
        return jnp.mean((batch["x"] + 0.0 * noise) @ params["w"] - batch["y"]) ** 2

    data_ = {"x": np.ones((8, 2), np.float32), "y": np.zeros(8, np.float32)}
    task = tasks.task(lambda key: {"w": jnp.ones(2)}, loss)
    train.fit(task, optax.sgd(0.1), (data_, data_), epochs=2, batch_size=4, mask=wdjax.masks.ALL,
              progress=False)  # fmt: skip
    jax.effects_barrier()
    fixed = tuple(np.asarray(jax.random.PRNGKey(0)).tolist())
    steps = [tuple(k.ravel().tolist()) for k in seen if tuple(k.ravel().tolist()) != fixed]
    assert len(steps) == 4 and len(set(steps)) == 4  # 2 epochs × 2 steps, keys all distinct
    assert len(seen) == 6  # and the fixed evaluation key, once per epoch


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_evaluate_is_the_mean_over_rows_whatever_the_batch_size(digits, batch_size):
    task = equinox_task()
    params, state = task.init(jax.random.PRNGKey(1))
    pool = jax.tree.map(jnp.asarray, _flat(digits))
    rows = jnp.arange(3, 300, 2)
    got = tasks.evaluate(task, params, state, pool, rows, batch_size)
    every = task.per_example(params, state, jax.tree.map(lambda a: a[rows], pool))
    for k, v in every.items():
        np.testing.assert_allclose(float(got[k]), float(jnp.mean(v)), rtol=1e-5)


def test_as_task_refuses_other_objects():
    with pytest.raises(TypeError, match="expected a wdjax.lab Task or Model"):
        tasks.as_task(object())
