"""The train step, fit loop, checkpoints and the reference models on real data."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import float_leaves

import wdjax
from benchmarks import bench_overhead
from wdjax import masks
from wdjax.lab import checkpoint, data, models, tasks, train

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


@pytest.fixture(scope="module")
def small_mlp(digits) -> models.Model:
    return models.create("mlp", input_shape=digits.input_shape, widths=(32,))


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fit_learns_digits_and_reports_metrics(digits, small_mlp):
    result = train.fit(
        small_mlp, wdjax.adamw(3e-3, 1e-3), digits, epochs=8, batch_size=64, progress=False
    )
    last = result.history[-1]
    test = train.evaluate(
        small_mlp, result.state.params, result.state.model_state, digits.x_test, digits.y_test
    )
    assert test["accuracy"] >= 0.93
    assert len(result.history) == 8 and last["step"] == 8 * (len(digits.x_train) // 64)
    assert last["learning_rate"] == pytest.approx(3e-3) and last["weight_decay"] == pytest.approx(
        1e-3
    )
    assert last["skipped"] == 0 and 0 <= last["zero_fraction"] < 0.01
    assert last["weight_norm"] == pytest.approx(
        np.hypot(last["weight_norm_decayed"], last["weight_norm_other"]), rel=1e-5
    )
    assert last["grad_norm"] > 0


def test_same_seed_same_run_other_seed_differs(digits, small_mlp):
    def run(seed):
        return train.fit(small_mlp, wdjax.adamw(1e-3), digits, epochs=2, seed=seed, progress=False)

    a, b, c = run(0), run(0), run(1)
    assert _leaves_equal(a.state.params, b.state.params) and a.history == b.history
    assert not _leaves_equal(a.state.params, c.state.params)


def test_penalty_terms_reported_and_added(digits, small_mlp):
    step = train.make_train_step(
        small_mlp, optax.sgd(0.1), penalties=[wdjax.l2(0.5, masks.default()), wdjax.l1(0.1)]
    )
    state = train.init_state(small_mlp, optax.sgd(0.1), jax.random.PRNGKey(0))
    batch = {"x": jnp.asarray(digits.x_train[:32]), "y": jnp.asarray(digits.y_train[:32])}
    _, metrics = jax.jit(step)(state, batch)
    expected_l2 = 0.25 * sum(
        float(jnp.sum(w**2))
        for k, layer in state.params.items()
        for n, w in layer.items()
        if n == "kernel"
    )
    assert float(metrics["l2"]) == pytest.approx(expected_l2, rel=1e-5)
    assert float(metrics["l1"]) == pytest.approx(
        0.1 * sum(float(jnp.sum(jnp.abs(w))) for w in jax.tree.leaves(state.params)), rel=1e-5
    )
    assert np.isnan(float(metrics["weight_decay"]))  # plain optax.sgd exposes no λ


def test_non_finite_step_is_skipped_and_counted(digits, small_mlp):
    opt = wdjax.adamw(1e-3)
    step = jax.jit(train.make_train_step(small_mlp, opt))
    state = train.init_state(small_mlp, opt, jax.random.PRNGKey(0))
    x = np.array(digits.x_train[:16])
    x[3, 2, 2, 0] = np.nan
    new, metrics = step(state, {"x": jnp.asarray(x), "y": jnp.asarray(digits.y_train[:16])})
    assert int(new.skipped) == 1 and int(metrics["skipped"]) == 1 and int(new.step) == 1
    assert _leaves_equal(new.params, state.params)
    floats = (float_leaves(s.opt_state) for s in (new, state))
    assert _leaves_equal(*floats)  # moments, η and λ as they were; the schedules' count moved on
    good, _ = step(
        new, {"x": jnp.asarray(digits.x_train[:16]), "y": jnp.asarray(digits.y_train[:16])}
    )
    assert int(good.skipped) == 1 and not _leaves_equal(good.params, state.params)


def test_an_unguarded_step_applies_a_non_finite_step_and_counts_it(digits, small_mlp):
    opt = wdjax.adamw(1e-3)
    step = jax.jit(train.make_train_step(small_mlp, opt, guard=False))
    state = train.init_state(small_mlp, opt, jax.random.PRNGKey(0))
    x = np.array(digits.x_train[:16])
    x[3, 2, 2, 0] = np.nan
    new, metrics = step(state, {"x": jnp.asarray(x), "y": jnp.asarray(digits.y_train[:16])})
    assert int(new.skipped) == 1 and int(metrics["skipped"]) == 1
    assert not all(bool(jnp.all(jnp.isfinite(w))) for w in jax.tree.leaves(new.params))
    assert bool(train.stretch_faulty(state, new))


def _damaged(state: train.TrainState, where: str, value: float) -> train.TrainState:
    """`state` with one element of its first kernel (or that kernel's Adam moment) set."""
    if where == "skipped":
        return state._replace(skipped=state.skipped + 1)
    leaf = {"params": state.params, "moment": state.opt_state}[where]
    path, w = next((p, w) for p, w in jax.tree_util.tree_leaves_with_path(leaf) if w.ndim == 2)
    bad = w.at[0, 0].set(value)
    tree = jax.tree_util.tree_map_with_path(lambda p, x: bad if p == path else x, leaf)
    return state._replace(**{"params" if where == "params" else "opt_state": tree})


@pytest.mark.parametrize(
    "where, value, start, faulty",
    [
        ("params", np.nan, None, True),
        ("params", np.inf, None, True),
        ("params", -np.inf, None, True),
        ("moment", np.nan, None, True),
        ("moment", np.inf, None, True),
        ("params", 3e38, None, False),  # large, finite
        ("skipped", 0, None, True),
        ("params", np.inf, np.inf, False),  # non-finite from the start (a best-so-far)
        ("params", np.nan, np.inf, False),
        ("moment", np.nan, np.nan, False),
    ],
)
def test_stretch_faulty_finds_what_the_guard_would_skip(small_mlp, where, value, start, faulty):
    opt = wdjax.adamw(1e-3)
    before = train.init_state(small_mlp, opt, jax.random.PRNGKey(0))
    if start is not None:
        before = _damaged(before, where, start)
    after = _damaged(before, where, value)
    assert bool(train.stretch_faulty(before, after)) is faulty
    assert not bool(train.stretch_faulty(before, before))


def test_a_clean_replayed_run_equals_the_guarded_one_and_never_replays(
    digits, small_mlp, monkeypatch
):
    verdicts = []
    faulty = train.stretch_faulty
    monkeypatch.setattr(
        train, "stretch_faulty", lambda a, b: verdicts.append(bool(faulty(a, b))) or verdicts[-1]
    )
    runs = {
        guard: train.fit(
            small_mlp, wdjax.adamw(1e-3, 1e-4), digits, epochs=2, progress=False, guard=guard
        )
        for guard in ("replay", "step")
    }
    assert verdicts == [False, False]
    for a, b in zip(runs["replay"].history, runs["step"].history, strict=True):
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5)


def test_global_norm_equals_optax_on_every_kind_of_tree(params_tree):
    # shapes of every rank (scalars, vectors, kernels), and the same tree in bfloat16
    for tree in (params_tree, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params_tree)):
        want = optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
        np.testing.assert_allclose(train.global_norm(tree), want, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(train.global_norm)(tree), want, rtol=1e-6)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params_tree)  # vmapped members
    want = optax.tree.norm(params_tree)
    np.testing.assert_allclose(jax.vmap(train.global_norm)(stacked), [want, 2 * want], rtol=1e-6)


_SHAPES = {"scalar": (), "vector": (7,), "matrix": (5, 3), "kernel": (3, 3, 2, 4), "empty": (0, 3)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None, 3e38])
@pytest.mark.parametrize("where", sorted(set(_SHAPES) - {"empty"}))
def test_all_finite_finds_one_bad_element_anywhere(where, bad):
    """One NaN or ±∞ in any leaf is found; large finite values (`3e38`, whose square and
    sum overflow) and no bad value at all are not."""
    tree = {k: jnp.ones(shape) for k, shape in _SHAPES.items()}
    if bad is not None:
        tree[where] = tree[where].reshape(-1).at[-1].set(bad).reshape(_SHAPES[where])
    finite = bad is None or bool(np.isfinite(bad))
    assert bool(train._all_finite(tree)) is finite
    assert bool(jax.jit(train._all_finite)(tree)) is finite


def test_the_compiled_step_copies_no_parameter_or_optimizer_state(small_mlp):
    """The skip of non-finite steps is a `lax.cond` whose applied branch computes the
    update itself, so XLA writes it in place: no full-size copy anywhere in the program
    (a `jnp.where` skip, or a branch passing a precomputed state through, copies every
    Adam moment)."""
    opt = wdjax.adamw(1e-3, 1e-4)
    step = jax.jit(train.make_train_step(small_mlp, opt), donate_argnums=0)
    state = train.init_state(small_mlp, opt, jax.random.PRNGKey(0))
    batch = {"x": jnp.zeros((8, *small_mlp.input_shape)), "y": jnp.zeros(8, jnp.int32)}
    hlo = step.lower(state, batch).compile().as_text()
    assert "conditional(" in hlo and bench_overhead.state_copies(hlo) == 0


def _with_frozen(model: models.Model) -> tasks.Task:
    """The model's task plus a 2-D leaf the loss never touches: its gradient is exactly 0."""
    inner = tasks.classifier(model)

    def init(key):
        params, state = inner.init(key)
        return {**params, "frozen": {"kernel": jnp.ones((4, 4))}}, state

    def drop(params):
        return {k: v for k, v in params.items() if k != "frozen"}

    return tasks.Task(
        init,
        lambda p, s, b, r: inner.loss(drop(p), s, b, r),
        lambda p, s, b: inner.per_example(drop(p), s, b),
    )


def test_masked_leaf_with_zero_gradient_stays_identical_to_no_decay(digits, small_mlp):
    task = _with_frozen(small_mlp)

    def fit(opt):
        result = train.fit(task, opt, digits, epochs=1, batch_size=128, progress=False)
        return result.state.params["frozen"]["kernel"]

    decayed = fit(wdjax.adamw(1e-2, 1.0))
    masked = fit(wdjax.adamw(1e-2, 1.0, mask=masks.default() & ~masks.match("frozen/*")))
    no_decay = fit(wdjax.adamw(1e-2, 0.0))
    assert np.array_equal(masked, no_decay) and np.array_equal(masked, np.ones((4, 4)))
    steps = len(digits.x_train) // 128
    np.testing.assert_allclose(decayed, (1 - 1e-2) ** steps * np.ones((4, 4)), rtol=1e-5)


def test_chunks_split_at_epochs_and_checkpoints():
    assert list(train.chunks(0, 10, 4, None)) == [4, 4, 2]
    assert list(train.chunks(0, 10, 4, 3)) == [3, 1, 2, 2, 1, 1]  # cuts at 3 4 6 8 9 10
    assert list(train.chunks(6, 10, 4, 3)) == [2, 1, 1]


def test_resume_from_checkpoint_equals_uninterrupted_run(digits, small_mlp, tmp_path):
    opt = wdjax.sgdw(0.05, 1e-3, momentum=0.9)
    every = len(digits.x_train) // 128  # one checkpoint per epoch; 2 epochs = 2N steps
    kwargs = dict(batch_size=128, seed=3, progress=False)

    def fit(directory, epochs):
        with checkpoint.Checkpointer(tmp_path / directory, every) as ckpt:
            return train.fit(small_mlp, opt, digits, epochs=epochs, checkpoints=ckpt, **kwargs)

    straight = fit("a", 2)
    first = fit("b", 1)
    assert int(first.state.step) == every
    resumed = fit("b", 2)
    assert int(resumed.state.step) == 2 * every
    assert _leaves_equal(resumed.state, straight.state)
    assert resumed.history == straight.history


def test_early_stopping_returns_best_state(digits, small_mlp):
    result = train.fit(
        small_mlp,
        wdjax.adamw(3e-2, 0.0),
        digits,
        epochs=40,
        batch_size=32,
        patience=2,
        progress=False,
    )
    assert result.stopped_early and len(result.history) < 40
    best = min(range(len(result.history)), key=lambda i: result.history[i]["val_loss"])
    assert len(result.history) - 1 - best == 2
    val = train.evaluate(
        small_mlp, result.state.params, result.state.model_state, digits.x_val, digits.y_val
    )
    assert val["loss"] == pytest.approx(result.history[best]["val_loss"], rel=1e-5)


def test_batch_norm_and_dropout_train(digits):
    model = models.create("cnn", input_shape=digits.input_shape, batch_norm=True, dropout=0.2)
    result = train.fit(
        model, wdjax.adamw(3e-3, 1e-4), digits, epochs=3, batch_size=64, progress=False
    )
    assert result.state.model_state  # batch stats carried and updated
    assert result.history[-1]["val_accuracy"] > 0.8


@pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason=f"shared MNIST test set not found at {SHARED_MNIST}"
)
def test_cnn_reaches_95_percent_on_real_mnist():
    ds = data.load("mnist", data_dir=SHARED_MNIST, seed=0)
    model = models.create("cnn", input_shape=ds.input_shape)
    result = train.fit(model, wdjax.adamw(1e-3, 5e-4), ds, epochs=4, batch_size=64, progress=False)
    test = train.evaluate(
        model, result.state.params, result.state.model_state, ds.x_test, ds.y_test
    )
    assert test["accuracy"] >= 0.95, test


def test_weight_metrics_once_an_epoch_equal_the_last_steps(digits, small_mlp):
    """`fit` computes weight norms and zero fraction from each epoch's last params (no
    pass over the params a step); they equal the last step's values of
    `weight_metrics="step"`, and only that mode shows them per step."""
    opt = wdjax.adamw(1e-2, 1e-2, l1=1e-3)
    runs = {}
    for mode in ("epoch", "step"):
        seen: list = []
        result = train.fit(
            small_mlp,
            opt,
            digits,
            epochs=2,
            batch_size=128,
            progress=False,
            weight_metrics=mode,
            on_epoch=lambda r, s, seen=seen: seen.append(s),
        )
        runs[mode] = (result.history, seen)
    (lean, lean_steps), (full, full_steps) = runs["epoch"], runs["step"]
    for a, b in zip(lean, full, strict=True):
        for k in ("weight_norm", "weight_norm_decayed", "weight_norm_other", "zero_fraction"):
            assert a[k] == pytest.approx(b[k], rel=1e-6)
    assert lean[-1]["zero_fraction"] > 0  # the L1 step made zeros: a real value
    assert "weight_norm" not in lean_steps[0] and len(full_steps[0]["weight_norm"]) > 1


@pytest.mark.parametrize(
    "option, value",
    [("weight_metrics", "never"), ("feed", "disk"), ("guard", "always"), ("guard", False)],
)
def test_fit_refuses_an_unknown_choice(digits, small_mlp, option, value):
    with pytest.raises(ValueError, match=rf"^{option} must be '.*, got {value!r}$"):
        train.fit(small_mlp, optax.sgd(0.1), digits, epochs=1, progress=False, **{option: value})


def test_a_second_fit_reuses_the_compiled_programs(digits, small_mlp):
    """Same task, optimizer and shapes: the second `fit` compiles nothing and traces
    nothing new (its runner is shared), and computes the same run."""
    opt = wdjax.adamw(1e-2, 1e-3)
    first = train.fit(small_mlp, opt, digits, epochs=1, batch_size=128, progress=False)
    events = []
    jax.monitoring.register_event_duration_secs_listener(lambda name, *_, **__: events.append(name))
    train.fit(small_mlp, opt, digits, epochs=1, batch_size=128, progress=False)
    assert not [e for e in events if e.endswith("backend_compile_duration")]
    jax.jit(lambda x: x * 3.0)(np.ones(2, np.float32))  # a compilation the listener hears
    assert [e for e in events if e.endswith("backend_compile_duration")]
    traces = []
    original = train.run_steps

    def spy(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    train.run_steps = spy
    try:
        again = train.fit(small_mlp, opt, digits, epochs=1, batch_size=128, progress=False)
        other = train.fit(small_mlp, wdjax.adamw(1e-2, 1e-3), digits, epochs=1, batch_size=128,
                          progress=False)  # fmt: skip
    finally:
        train.run_steps = original
    assert len(traces) == 1  # only the fresh optimizer object was traced
    for run in (again, other):
        np.testing.assert_allclose(run.history[-1]["loss"], first.history[-1]["loss"], rtol=1e-6)
