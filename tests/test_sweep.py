"""Vectorized sweeps: every member is the run ``fit`` does; folds, chunking, selection, outputs.

Tolerance. A member of a K-wide vmapped program runs the same operations on the same
values as its sequential ``fit`` run, but XLA compiles a different program for each shape
and chooses fusions (and with them the order of float32 reductions) by size: on CPU the
class logsumexp of K·128 logits fuses differently for K ≥ 4 than for K ≤ 3 and rounds
differently in the last bit. Those ulps feed through training, so final params agree to
``rtol=1e-5, atol=1e-6`` — not bit for bit, between sweep and ``fit`` as between two
chunk sizes. Everything the library decides (members, seeds, batches, folds, selection)
is identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wdjax
from wdjax import masks, optimizers
from wdjax.distributed import Layout, make_mesh
from wdjax.lab import data, models, sweeps, tasks, train
from wdjax.lab.folds import kfold_rows
from wdjax.lab.memory import CPU_MEMORY_BUDGET, member_bytes, memory_budget
from wdjax.lab.selection import select_setting
from wdjax.lab.sweeps import SweepResult, sweep

TOL = {"rtol": 1e-5, "atol": 1e-6}
GRID = {
    "weight_decay": [0.0, 0.05],
    "learning_rate": [2e-3, 5e-3],
    "l1": [0.0, 1e-3],
    "seeds": [0, 1],
    "epochs": 2,
    "batch_size": 128,
    "progress": False,
}


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


@pytest.fixture(scope="module")
def mlp(digits) -> models.Model:
    return models.create("mlp", input_shape=digits.input_shape, widths=(32,))


@pytest.fixture(scope="module")
def grid(digits, mlp) -> SweepResult:
    """λ × η × α × seed = 16 members, one program (chunk_size picked by the library)."""
    return sweep(digits, model=mlp, **GRID)


@pytest.fixture(scope="module")
def cv(digits, mlp) -> SweepResult:
    """3 λ × 3 folds in chunks of 2: the last chunk is padded."""
    return sweep(
        digits, model=mlp, weight_decay=[0.0, 1e-2, 1e-1], learning_rate=[3e-3], folds=3,
        epochs=2, batch_size=128, chunk_size=2, select="one_se", progress=False,
    )  # fmt: skip


def member(result: SweepResult, i: int):
    return jax.tree.map(lambda a: a[i], result.params)


def assert_trees_close(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def test_grid_members_settings_and_stats(grid):
    assert grid.config["members"] == 16 and grid.config["chunk_size"] == 16
    assert len(grid.settings) == 8 and all(s["n"] == 2 for s in grid.settings)
    assert [(m["setting"], m["seed"]) for m in grid.members] == [
        (s, seed) for s in range(8) for seed in (0, 1)
    ]
    assert all(v.shape == (16, 2) for v in grid.history.values())
    assert jax.tree.leaves(grid.params)[0].shape[0] == 16
    s = grid.settings[5]
    runs = [m["val_accuracy"] for m in grid.members if m["setting"] == 5]
    assert s["val_accuracy_mean"] == pytest.approx(np.mean(runs))
    assert s["val_accuracy_std"] == pytest.approx(np.std(runs, ddof=1))
    assert s["val_accuracy_se"] == pytest.approx(s["val_accuracy_std"] / math.sqrt(2))
    assert grid.settings[grid.chosen_index]["val_accuracy_mean"] == max(
        s["val_accuracy_mean"] for s in grid.settings
    )
    assert all(m["skipped"] == 0 for m in grid.members)


@pytest.mark.parametrize(
    "i", [0, 7, 13]
)  # (λ, η, α, seed) = (0, 2e-3, 0, 0), (0, 5e-3, 1e-3, 1), (0.05, 5e-3, 0, 1)
def test_member_equals_sequential_fit(digits, mlp, grid, i):
    m = grid.members[i]
    opt = optimizers.adamw(m["learning_rate"], m["weight_decay"], l1=m["l1"])
    ref = train.fit(mlp, opt, digits, epochs=2, batch_size=128, seed=m["seed"], progress=False)
    assert_trees_close(member(grid, i), ref.state.params)
    last = ref.history[-1]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "weight_norm", "zero_fraction"):
        assert m[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key


def _sort_shapes(epoch, *args) -> list[str]:
    hlo = epoch.lower(*args).compile().as_text()
    return re.findall(r"= \(?\w+(\[[\d,]*\])[^=]* sort\(", hlo)


def test_members_of_one_seed_share_one_batch_order(digits, mlp):
    """Members of one seed draw their batch order once (a sort over the rows, with no
    member axis; members of several seeds sort each their own), and each still trains
    exactly as its `fit` run."""
    kw = {"weight_decay": [0.0, 0.05], "learning_rate": [5e-3], "epochs": 2}
    got = sweep(digits, model=mlp, batch_size=128, progress=False, **kw)
    for i, m in enumerate(got.members):
        opt = optimizers.adamw(m["learning_rate"], m["weight_decay"])
        ref = train.fit(mlp, opt, digits, epochs=2, batch_size=128, progress=False)
        assert_trees_close(member(got, i), ref.state.params)

    task = tasks.as_task(mlp)
    opt = optimizers.adamw(5e-3, 0.0)
    _, epoch = sweeps._program(task, opt, 128, (), masks.DEFAULT)
    one = train.init_state(task, opt, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a: jnp.stack([a] * 2), one)
    args = (state, digits.arrays("train"), None, digits.arrays("val"), None, 9)
    n = len(digits.y_train)
    assert _sort_shapes(epoch, *args, (one.rng, jnp.int32(0))) == [f"[{n}]"]
    assert _sort_shapes(epoch, *args) == [f"[2,{n}]"]


def test_a_chunk_with_a_diverging_member_replays_and_stays_guarded(digits, mlp, monkeypatch):
    """η = 1e30 blows the second member up at its second step (its later steps are all
    skipped): its chunk's first epoch runs unguarded, again guarded, and the chunk stays
    guarded; the other chunk never runs guarded. Every member is still its `fit` run."""
    runs = []

    def spy(stretch, state):
        flags = []
        runs.append(flags)
        return train.replay_faulty(lambda s, g: flags.append(g) or stretch(s, g), state)

    monkeypatch.setattr(sweeps, "replay_faulty", spy)
    lrs = [5e-3, 1e30, 2e-3]
    got = sweep(digits, model=mlp, learning_rate=lrs, weight_decay=[0.0], epochs=2, batch_size=128,
                chunk_size=2, progress=False)  # fmt: skip
    assert runs == [[False, True], [False], [False]]  # chunk 1: epoch 1 only; chunk 2: both
    assert [m["skipped"] > 0 for m in got.members] == [False, True, False]
    for i, lr in enumerate(lrs):
        ref = train.fit(mlp, optimizers.adamw(lr, 0.0), digits, epochs=2, batch_size=128,
                        progress=False)  # fmt: skip
        assert_trees_close(member(got, i), ref.state.params)
        assert got.members[i]["skipped"] == ref.history[-1]["skipped"]


def test_chunks_of_two_equal_one_chunk(digits, mlp, grid):
    chunked = sweep(digits, model=mlp, chunk_size=2, **GRID)
    assert chunked.config["chunk_size"] == 2
    assert chunked.chosen_index == grid.chosen_index
    assert [m["setting"] for m in chunked.members] == [m["setting"] for m in grid.members]
    assert_trees_close(chunked.params, grid.params)
    for key, values in grid.history.items():
        np.testing.assert_allclose(chunked.history[key], values, **TOL, err_msg=key)


def test_members_one_after_another_equal_the_batched_sweep(digits, mlp, grid):
    """`batching="map"` (lax.map over the chunk's members) trains the same members."""
    mapped = sweep(digits, model=mlp, batching="map", **GRID)
    assert mapped.config["batching"] == "map" and mapped.chosen_index == grid.chosen_index
    assert_trees_close(mapped.params, grid.params)
    for key, values in grid.history.items():
        np.testing.assert_allclose(mapped.history[key], values, **TOL, err_msg=key)


def test_kfold_rows_partition_and_stratify():
    y = np.repeat(np.arange(4), [30, 21, 17, 9])  # n = 77
    for stratified in (True, False):
        train_rows, held = kfold_rows(y, 5, seed=3, stratified=stratified)
        assert held.shape == (5, 15) and train_rows.shape == (5, 60)  # 77 mod 5 = 2 rows dropped
        assert len(np.unique(held)) == 75
        for f in range(5):
            assert not set(train_rows[f]) & set(held[f])
            assert set(train_rows[f]) | set(held[f]) == set(held.ravel())
    counts = np.stack([np.bincount(y[h], minlength=4) for h in kfold_rows(y, 5, seed=3)[1]])
    assert (counts.max(0) - counts.min(0) <= 1).all()  # every fold gets each class in proportion
    np.testing.assert_array_equal(kfold_rows(y, 5, seed=3)[1], kfold_rows(y, 5, seed=3)[1])
    with pytest.raises(ValueError, match="folds"):
        kfold_rows(y, 1)


def test_cross_validation_member_equals_fit_on_its_fold(digits, mlp, cv):
    assert cv.config["members"] == 9 and [s["n"] for s in cv.settings] == [3, 3, 3]
    assert [(m["setting"], m["fold"]) for m in cv.members] == [
        (s, f) for s in range(3) for f in range(3)
    ]
    x = np.concatenate([digits.x_train, digits.x_val])
    y = np.concatenate([digits.y_train, digits.y_val])
    rows, held = kfold_rows(y, 3)
    m = cv.members[8]  # λ = 0.1, fold 2: alone in the last, padded chunk
    fold = dataclasses.replace(
        digits, x_train=x[rows[2]], y_train=y[rows[2]], x_val=x[held[2]], y_val=y[held[2]]
    )
    ref = train.fit(
        mlp, optimizers.adamw(3e-3, 0.1), fold, epochs=2, batch_size=128, progress=False
    )
    assert_trees_close(member(cv, 8), ref.state.params)
    assert m["val_accuracy"] == pytest.approx(ref.history[-1]["val_accuracy"], abs=1e-6)


def _settings(mean, se, wd, lr):
    return [
        {"weight_decay": w, "learning_rate": r, "val_m_mean": m, "val_m_se": e}
        for m, e, w, r in zip(mean, se, wd, lr, strict=True)
    ]


def test_select_best_and_one_standard_error():
    wd = [0.0, 1e-3, 1e-2, 1e-1] * 2
    lr = [1e-3] * 4 + [1e-2] * 4  # two learning rates: one_se stays within the best's
    mean = np.array([0.90, 0.95, 0.94, 0.80, 0.91, 0.93, 0.96, np.nan])
    se = np.full(8, 0.015)
    names = ["weight_decay", "learning_rate"]

    def pick(select, maximize=True, m=mean, e=se):
        settings = _settings(m, e, wd, lr)
        return select_setting(settings, "val_m", maximize=maximize, select=select, names=names)

    assert pick("best") == 6
    assert pick("one_se") == 6  # nothing else within 1 SE
    se[6] = 0.04  # within: 0.93 (λ=1e-3) and 0.96 (λ=1e-2); λ=0.1 is NaN
    assert pick("one_se") == 6
    mean[[3, 7]] = 0.95, 0.93  # λ=0.1 now within in both groups: the best one's group wins
    assert pick("one_se") == 7
    loss = np.array([0.5, 0.3, 0.31, 0.6] * 2)
    assert pick("best", False, loss, np.full(8, 0.02)) in (1, 5)
    assert pick("one_se", False, loss, np.full(8, 0.02)) in (2, 6)


def test_cv_one_se_choice_and_plot(cv, tmp_path):
    best = max(s["val_accuracy_mean"] for s in cv.settings)
    chosen = cv.chosen
    se_best = next(s["val_accuracy_se"] for s in cv.settings if s["val_accuracy_mean"] == best)
    assert chosen["val_accuracy_mean"] >= best - se_best
    assert all(
        s["weight_decay"] <= chosen["weight_decay"]
        for s in cv.settings
        if s["val_accuracy_mean"] >= best - se_best
    )
    fig = cv.plot(tmp_path / "cv.png")
    assert fig.axes[0].get_xscale() == "symlog"  # λ = 0 on the axis
    assert (tmp_path / "cv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_json_and_heatmap(grid, tmp_path):
    lines = grid.table().splitlines()
    assert lines[0].split() == [
        "weight_decay",
        "learning_rate",
        "l1",
        "n",
        "train_loss",
        "train_accuracy",
        "val_accuracy",
        "val_loss",
        "weight_norm",
        "zero_fraction",
    ]
    assert len(lines) == 1 + 8 + 1 and lines[1 + grid.chosen_index].lstrip().startswith("*")
    assert lines[-1].startswith("chosen (best mean val_accuracy, 2 run(s) each): weight_decay=")

    broken = dataclasses.replace(
        grid, settings=[{**s, "val_loss_mean": math.nan} for s in grid.settings]
    )
    broken.to_json(tmp_path / "sweep.json")
    doc = json.loads((tmp_path / "sweep.json").read_text(), parse_constant=pytest.fail)
    assert doc["chosen"] == doc["settings"][grid.chosen_index]
    assert doc["chosen"]["val_loss_mean"] is None  # strict JSON: NaN written as null
    assert doc["config"]["grid"]["weight_decay"] == [0.0, 0.05] and len(doc["members"]) == 16
    assert np.array(doc["history"]["val_accuracy"]).shape == (16, 2)

    fig = grid.plot(tmp_path / "grid.png")  # 2 λ × 2 η: a heatmap
    assert fig.axes[0].images and (tmp_path / "grid.png").stat().st_size > 0


def test_memory_estimate_and_budget(mlp):
    opt = optimizers.adamw(1e-3, 1e-4)
    state = jax.eval_shape(lambda k: train.init_state(mlp, opt, k), jax.random.PRNGKey(0))
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
    step = train.make_train_step(mlp, opt)

    def batch(n):
        x = jax.ShapeDtypeStruct((n, *mlp.input_shape), np.float32)
        return {"x": x, "y": jax.ShapeDtypeStruct((n,), np.int32)}

    small, large = member_bytes(step, state, batch(32)), member_bytes(step, state, batch(256))
    assert state_bytes < small < large
    assert large - small >= 4 * (256 - 32) * 64  # at least the batch's inputs
    if jax.devices()[0].memory_stats() is None:
        assert memory_budget() == CPU_MEMORY_BUDGET


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_decay": []}, "weight_decay needs at least one value"),
        ({"weight_decay": [-1.0]}, "weight_decay must be >= 0"),
        ({"weight_decay": ["0.1"]}, "weight_decay must be a real number"),
        ({"select": "median"}, "select"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"folds": 1}, "folds must be >= 2"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"metric": "f1"}, "metric 'f1' is not a validation metric"),
        ({"optimizer": optax.adamw(1e-3)}, "does not inject"),
        ({"weight_decay": None, "select": "one_se"}, "sweep weight_decay"),
        ({"optimizer": wdjax.adamw(1e-3), "optimizer_config": {"b1": 0.8}}, "named optimizers"),
        ({"batching": "pmap"}, "batching must be 'vmap' or 'map'"),
        (
            {"batching": "map", "layout": Layout(make_mesh("members=-1"))},
            "use batching='vmap'",
        ),
    ],
)
def test_bad_arguments(digits, mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep(digits, model=mlp, progress=False, epochs=1, **kwargs)
