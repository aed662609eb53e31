"""λ that chooses itself: tasks where λ matters (wdjax.lab.variants) and the
hypergradient tuner (wdjax.hypergradient) alone, in `fit` and in the CLI."""

from __future__ import annotations

import json
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wdjax
from wdjax import masks
from wdjax.hypergradient import Tuner
from wdjax.lab import cli, data, models, train, variants

PARAMS = {"dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.ones(4)}}
GRADS = jax.tree.map(lambda x: 0.3 * jnp.cos(x), PARAMS)
HELD = jax.tree.map(lambda x: 0.5 - jnp.sin(3 * x), PARAMS)  # ∇L_val at θ⁺ (any tree)


# ---------------------------------------------------------------- variants


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_label_noise_changes_exactly_that_many_training_labels(digits, rate):
    noisy = variants.label_noise(digits, rate, seed=1)
    wrong = int(np.sum(noisy.y_train != digits.y_train))
    assert wrong == round(rate * len(digits.y_train))
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < digits.num_classes
    for split in ("val", "test"):  # held-out labels stay clean
        np.testing.assert_array_equal(noisy.arrays(split)["y"], digits.arrays(split)["y"])
    again = variants.label_noise(digits, rate, seed=1)
    np.testing.assert_array_equal(again.y_train, noisy.y_train)  # a function of the seed
    assert noisy.name == f"digits+noise{rate:g}"


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_subsample_keeps_a_stratified_fraction(digits, fraction):
    small = variants.subsample(digits, fraction, seed=2)
    counts = np.bincount(digits.y_train, minlength=10)
    kept = np.bincount(small.y_train, minlength=10)
    np.testing.assert_array_equal(kept, np.maximum(1, np.round(fraction * counts)))
    rows = {r.tobytes() for r in digits.x_train}
    assert all(r.tobytes() in rows for r in small.x_train)  # a subset, no new images
    np.testing.assert_array_equal(small.x_val, digits.x_val)


def test_sparse_regression_has_k_nonzero_coefficients():
    task = variants.sparse_regression(n=50, d=80, k=7, noise=0.1, seed=3)
    assert np.count_nonzero(task.w) == 7 and set(np.abs(task.w[task.w != 0])) == {1.0}
    for split in (task.train, task.val, task.test):
        assert split["x"].shape == (50, 80) and split["y"].shape == (50,)
    residual = task.train["y"] - task.train["x"] @ task.w
    assert 0.05 < residual.std() < 0.2  # the noise level asked for


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ds: variants.label_noise(ds, 1.5), "label noise rate must be in"),
        (lambda ds: variants.label_noise(ds, -0.1), "label noise rate must be in"),
        (lambda ds: variants.subsample(ds, 0.0), "training fraction must be in"),
        (lambda ds: variants.subsample(ds, 2.0), "training fraction must be in"),
        (lambda ds: variants.sparse_regression(d=5, k=6), "need 0 < k <= d"),
    ],
)
def test_variants_refuse_bad_arguments(digits, call, message):
    with pytest.raises(ValueError, match=message):
        call(digits)


# ------------------------------------------------------------------ Tuner


def _after(opt, lam):
    state = opt.init(PARAMS)
    state = wdjax.set_hyperparams(state, weight_decay=lam)
    return state


@pytest.mark.parametrize(
    "name, build, c",
    [
        ("adamw lr", lambda: wdjax.adamw(0.1, 0.01), 0.1),
        ("sgdw lr", lambda: wdjax.sgdw(0.05, 0.01, momentum=0.9), 0.05),
        ("lionw lr", lambda: wdjax.lionw(0.02, 0.01), 0.02),
        (
            "adamw constant",
            lambda: wdjax.adamw(0.1, 0.01, lr_coupling="constant"),
            1.0,
        ),
    ],
)
def test_decoupled_hypergradient_is_the_closed_form(name, build, c):
    """`∂L_val(θ⁺)/∂log λ = −c·λ·⟨∇L_val, M⊙θ⟩` for `θ⁺ = θ − η·u − c·λ·(M⊙θ)`."""
    opt = build()
    state = opt.init(PARAMS)
    h = jax.jit(Tuner(opt).hypergradient)(GRADS, state, PARAMS, HELD)
    decayed = masks.resolve(PARAMS, masks.DEFAULT)
    inner = sum(
        float(jnp.vdot(g, w)) if d else 0.0
        for g, w, d in zip(jax.tree.leaves(HELD), jax.tree.leaves(PARAMS), decayed, strict=True)
    )
    assert float(h) == pytest.approx(-c * 0.01 * inner, rel=1e-5)


@pytest.mark.parametrize(
    "build",
    [lambda: wdjax.sgd_l2(0.1, 0.05), lambda: wdjax.adam_l2(0.1, 0.05, mask=masks.ALL)],
    ids=["sgd_l2", "adam_l2"],
)
def test_coupled_l2_hypergradient_matches_finite_differences(build):
    """Through the preconditioner: `h` equals a central difference in log λ of
    `⟨∇L_val, θ⁺(λ)⟩` (a linear held-out loss, so its gradient is HELD everywhere)."""
    opt = build()
    state = opt.init(PARAMS)
    for k in range(3):  # past Adam's first step, whose update is ±η whatever λ is
        state = opt.update(jax.tree.map(lambda g, k=k: g * (k - 1.5), GRADS), state, PARAMS)[1]
    h = float(Tuner(opt).hypergradient(GRADS, state, PARAMS, HELD))

    def val(log_lam):
        s = wdjax.set_hyperparams(state, weight_decay=jnp.exp(log_lam))
        new = optax.apply_updates(PARAMS, opt.update(GRADS, s, PARAMS)[0])
        return sum(
            float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(HELD), jax.tree.leaves(new))
        )

    eps = 1e-2
    fd = (val(np.log(0.05) + eps) - val(np.log(0.05) - eps)) / (2 * eps)
    assert h != 0 and h == pytest.approx(fd, rel=2e-3)


def test_the_step_moves_log_lambda_against_the_hypergradient_within_bounds():
    tuner = Tuner(wdjax.adamw(0.1, 0.01), learning_rate=0.5, bounds=(1e-3, 0.1))
    state = tuner.init(_after(tuner.optimizer, 0.01))
    up = tuner.update(state, jnp.float32(-1.0))  # lowering the held-out loss needs more λ
    down = tuner.update(state, jnp.float32(2.0))
    assert float(tuner.rate(up)) == pytest.approx(0.01 * np.exp(0.5), rel=1e-4)
    assert float(tuner.rate(down)) == pytest.approx(0.01 * np.exp(-0.5), rel=1e-4)
    for _ in range(20):
        up, down = tuner.update(up, jnp.float32(-1.0)), tuner.update(down, jnp.float32(1.0))
    assert float(tuner.rate(up)) == pytest.approx(0.1) and float(tuner.rate(down)) == pytest.approx(
        1e-3
    )
    stuck = tuner.update(state, jnp.float32(jnp.nan))  # a NaN hypergradient moves nothing
    assert float(tuner.rate(stuck)) == pytest.approx(0.01)


def test_every_k_steps():
    tuner = Tuner(wdjax.adamw(0.1, 0.01), every=3)
    state = tuner.init(_after(tuner.optimizer, 0.01))
    rates = []
    for _ in range(6):
        state = tuner.update(state, jnp.float32(1.0))
        rates.append(float(tuner.rate(state)))
    assert rates[0] == rates[1] == pytest.approx(0.01) and rates[2] < 0.01
    assert rates[3] == rates[4] == rates[2] and rates[5] < rates[2]


def test_the_tuner_is_jit_and_vmap_clean_and_writes_lambda_into_the_state():
    opt = wdjax.adamw(0.1, 0.01)
    tuner = Tuner(opt, learning_rate=0.1)
    lams = jnp.array([1e-4, 1e-2, 1e-1])

    def one(lam):
        state = wdjax.set_hyperparams(opt.init(PARAMS), weight_decay=lam)
        updates, new_state = opt.update(GRADS, state, PARAMS)
        t_state, new_state = tuner.step(tuner.init(state), GRADS, state, PARAMS, HELD, new_state)
        return tuner.rate(t_state), new_state.hyperparams["weight_decay"]

    rates, written = jax.jit(jax.vmap(one))(lams)
    chex.assert_trees_all_close(rates, written)
    for lam, rate in zip(lams, rates, strict=True):
        assert float(rate) != pytest.approx(float(lam))
        assert float(rate) == pytest.approx(float(one(lam)[0]), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bounds": (0.0, 1.0)}, "bounds must be"),
        ({"bounds": (1.0, 0.1)}, "bounds must be"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be > 0"),
        ({"every": 0}, "every must be an int >= 1"),
        ({"b1": 1.0}, "moment coefficients"),
        ({"neumann": -1}, "neumann must be an int >= 0"),
        ({"neumann_lr": 0.0}, "neumann_lr must be > 0"),
        ({"horizon": 0.5}, "horizon must be >= 1"),
        ({"horizon": float("nan")}, "horizon must be >= 1"),
        ({"horizon": 10, "neumann": 2}, "use it with horizon=1"),
        ({"start": -1}, "start must be an int >= 0"),
    ],
)
def test_tuner_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tuner(wdjax.adamw(0.1, 0.01), **kwargs)


def test_tuner_needs_an_injected_hyperparameter_and_forward_mode_params():
    opt = optax.adamw(0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match="does not inject 'weight_decay'"):
        Tuner(opt).init(opt.init(PARAMS))
    opt = wdjax.adamw(0.1, 0.01)
    with pytest.raises(ValueError, match="needs params"):
        Tuner(opt, horizon=100).init(opt.init(PARAMS))


# ----------------------------------------------------------- in fit and the CLI


@pytest.fixture(scope="module")
def noisy(digits) -> data.Dataset:
    return variants.label_noise(digits, 0.3, seed=0)


def _tuned_fit(ds, lam0: float, epochs: int = 4, **kw):
    model = models.create("mlp", input_shape=(8, 8, 1), widths=(64,))
    opt = wdjax.adamw(1e-2, lam0, lr_coupling="schedule", max_learning_rate=1e-2)
    tuner = Tuner(opt, learning_rate=0.1, bounds=(1e-6, 1.0))
    return train.fit(
        model, opt, ds, epochs=epochs, batch_size=64, progress=False, tuner=tuner, **kw
    )


def test_fit_tunes_lambda_and_records_it(noisy):
    result = _tuned_fit(noisy, 0.1)
    lams = [h["weight_decay"] for h in result.history]
    assert lams[0] < 0.1 and len(set(lams)) == len(lams)  # it moved every epoch
    assert all(0.99e-6 <= lam <= 1.0 for lam in lams)  # the bounds, in float32
    assert all(np.isfinite(h["hypergradient"]) for h in result.history)
    assert float(result.state.tuner.log_rate) == pytest.approx(np.log(lams[-1]), rel=1e-5)


def test_hypergradient_on_training_data_drives_lambda_down(noisy):
    """The documented failure mode: tuned on the data it trains on, every hypergradient
    is positive (the training loss always prefers less decay) and λ only falls: from
    0.1 to below 1e-3 in 6 epochs. (On this task the one-step hypergradient on held-out
    data falls too: the short-horizon bias, measured in docs/auto_lambda.md.)"""
    train_split = noisy.arrays("train")
    model = models.create("mlp", input_shape=(8, 8, 1), widths=(64,))
    opt = wdjax.adamw(1e-2, 0.1, lr_coupling="schedule", max_learning_rate=1e-2)
    tuner = Tuner(opt, learning_rate=0.3, bounds=(1e-6, 1.0))
    result = train.fit(
        model, opt, (train_split, train_split), epochs=6, batch_size=64, progress=False,
        tuner=tuner,
    )  # fmt: skip
    lams = [0.1] + [h["weight_decay"] for h in result.history]
    assert all(b < a for a, b in zip(lams, lams[1:], strict=False))
    assert all(h["hypergradient"] > 0 for h in result.history)
    assert lams[-1] < 1e-3


def test_a_tuned_run_resumes_exactly(noisy, tmp_path):
    from wdjax.lab import checkpoint

    straight = _tuned_fit(noisy, 1e-2, epochs=3)
    with checkpoint.Checkpointer(tmp_path, every=14) as ckpt:
        _tuned_fit(noisy, 1e-2, epochs=2, checkpoints=ckpt)
    with checkpoint.Checkpointer(tmp_path, every=14) as ckpt:
        resumed = _tuned_fit(noisy, 1e-2, epochs=3, checkpoints=ckpt)
    assert [h["weight_decay"] for h in resumed.history] == [
        h["weight_decay"] for h in straight.history
    ]
    chex.assert_trees_all_equal(resumed.state.tuner, straight.state.tuner)


def test_cli_weight_decay_auto(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--weight-decay", "auto", "--auto-decay-init", "0.05", "--epochs", "3"]
    argv += ["--label-noise", "0.3", "--widths", "32", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["decay"]["tuned"] == "by hypergradient from λ₀ = 0.05, horizon inf"
    assert summary["decay"]["lambda"] == records[-1]["weight_decay"] != 0.05
    assert "digits+noise0.3" in summary["dataset"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_show_a_tuned_lambda(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from wdjax.lab import report

    titles = []
    original = Axes.set

    def spy(self, **kw):
        titles.append(kw.get("title"))
        return original(self, **kw)

    monkeypatch.setattr(Axes, "set", spy)
    history = [
        {"epoch": e, "loss": 1.0, "val_loss": 1.0, "weight_decay": 10.0**-e, "hypergradient": 0.1}
        for e in (1, 2)
    ]
    report.plot_history(history, tmp_path / "c.png")
    assert "λ (tuned)" in titles
    report.plot_history([{k: v for k, v in h.items() if k != "hypergradient"} for h in history],
                        tmp_path / "d.png")  # fmt: skip
    assert titles.count("λ (tuned)") == 1


# -------------------------------------------------------------- timescales


RUN = {"steps_per_epoch": 20, "total_steps": 200}


@pytest.mark.parametrize(
    "coupling, lr, c_mean",
    [
        ("lr", 1e-2, 1e-2),
        ("constant", 1e-2, 1.0),
        ("schedule", optax.linear_schedule(1e-2, 0.0, 200), 0.5025),  # mean of (200 − t)/200
    ],
)
def test_timescale_and_its_inverse(coupling, lr, c_mean):
    kw = {"learning_rate": lr, "lr_coupling": coupling, **RUN}
    if coupling == "schedule":
        kw["max_learning_rate"] = 1e-2
    lam = wdjax.timescale.rate_for_timescale(3.0, **kw)  # τ = 3 epochs
    assert lam == pytest.approx(1 / (c_mean * 60), rel=1e-3)
    t = wdjax.timescale.timescale(lam, **kw)
    assert t.tau_epoch == pytest.approx(3.0, rel=1e-6) and t.tau_iter == pytest.approx(60.0)
    assert t.tau_fraction == pytest.approx(0.3) and t.total_shrinkage == pytest.approx(200 / 60)
    frac = wdjax.timescale.rate_for_timescale(0.3, unit="fraction", **kw)
    assert frac == pytest.approx(lam, rel=1e-9)


@pytest.mark.parametrize(
    "lam, message", [(1.0, "forgets within one epoch"), (1e-5, "longer than the run")]
)
def test_timescale_warns_outside_the_run(lam, message):
    with pytest.warns(RuntimeWarning, match=message):
        wdjax.timescale.timescale(lam, learning_rate=0.1, **RUN)


@pytest.mark.parametrize(
    "rule, source, target, factor",
    [
        ("batch", {"batch_size": 64}, {"batch_size": 256}, 4.0),
        ("width_mup", {"width": 128}, {"width": 512}, 4.0),
        ("width_sqrt", {"width": 128}, {"width": 512}, 2.0),
        (
            "constant_tau_epoch",
            {"c": 1e-3, "batch_size": 64, "dataset_size": 1000},
            {"c": 2e-3, "batch_size": 128, "dataset_size": 4000},
            0.5 * 2 * 0.25,
        ),
    ],
)
def test_transfer_rules(rule, source, target, factor):
    assert wdjax.timescale.transfer(0.01, rule=rule, source=source, target=target) == (
        pytest.approx(0.01 * factor)
    )
    assert rule in wdjax.timescale.RULES


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: wdjax.timescale.transfer(0.1, rule="magic", source={}, target={}), "unknown"),
        (
            lambda: wdjax.timescale.transfer(
                0.1, rule="batch", source={}, target={"batch_size": 2}
            ),
            "needs source batch_size",
        ),
        (lambda: wdjax.timescale.timescale(0.0, learning_rate=0.1, **RUN), "λ > 0"),
        (lambda: wdjax.timescale.rate_for_timescale(-1, learning_rate=0.1, **RUN), "> 0"),
        (
            lambda: wdjax.timescale.rate_for_timescale(1, unit="days", learning_rate=0.1, **RUN),
            "unit must be",
        ),
        (
            lambda: wdjax.timescale.timescale(
                0.1, learning_rate=0.1, steps_per_epoch=0, total_steps=1
            ),
            "steps_per_epoch >= 1",
        ),
    ],
)
def test_timescale_refuses_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------ the measured page


def _lambda_tasks():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lambda_tasks.py"
    spec = importlib.util.spec_from_file_location("lambda_tasks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parents[1]


def test_the_lambda_tasks_page_is_the_render_of_its_json():
    """docs/lambda_tasks.md is what `benchmarks/lambda_tasks.py` made of the JSON it cites."""
    module, root = _lambda_tasks()
    page = (root / "docs" / "lambda_tasks.md").read_text()
    cited = re.search(r"JSON: `([^`]+)`", page).group(1)
    results = json.loads((root / cited).read_text())
    assert module.render(results) == page
    noisy = results["curves"]["digits+noise0.3"]
    assert noisy["gap_in_se"] > 2  # the task the examples and tests use: λ matters there


@pytest.mark.slow
def test_lambda_tasks_quick_run(capsys):
    module, _ = _lambda_tasks()
    results = module.main(["--quick"])
    assert set(results["curves"]) == {
        "digits", "digits+noise0.3", "digits+frac0.25", "digits+frac0.25+noise0.3"
    }  # fmt: skip
    for start in results["tuner"]["starts"].values():
        assert all(0.99e-6 <= lam <= 1.0 for lam in start["lambda"])  # float32 bounds
    assert "## The hypergradient tuner" in capsys.readouterr().out


def test_sweep_tunes_each_member_from_its_initial_lambda(noisy):
    """`sweep(..., tuner=)`: every member starts from its grid λ and tunes it on its own
    held-out rows; a member equals `fit` with the same tuner (no folds)."""
    model = models.create("mlp", input_shape=(8, 8, 1), widths=(64,))
    opt = wdjax.adamw(1e-2, 0.0, lr_coupling="schedule", max_learning_rate=1e-2)
    tuner = Tuner(opt, learning_rate=0.1, bounds=(1e-6, 1.0))
    starts = [1e-4, 1e-1]
    found = wdjax.sweep(noisy, model=model, optimizer=opt, weight_decay=starts, epochs=2,
                        batch_size=64, tuner=tuner, progress=False)  # fmt: skip
    lams = found.history["weight_decay"]
    assert lams.shape == (2, 2) and np.all(np.isfinite(found.history["hypergradient"]))
    assert lams[1, -1] != pytest.approx(1e-1) and lams[1, -1] > lams[0, -1]
    large = wdjax.adamw(1e-2, 1e-1, lr_coupling="schedule", max_learning_rate=1e-2)
    alone = train.fit(
        model, large, noisy, epochs=2, batch_size=64, progress=False,
        tuner=Tuner(large, learning_rate=0.1, bounds=(1e-6, 1.0)),
    )  # fmt: skip
    assert lams[1, -1] == pytest.approx(alone.history[-1]["weight_decay"], rel=1e-4)
    folded = wdjax.sweep(noisy, model=model, optimizer=opt, weight_decay=starts, folds=2,
                         epochs=1, batch_size=64, tuner=tuner, progress=False)  # fmt: skip
    assert folded.history["weight_decay"].shape == (4, 1)
    with pytest.raises(ValueError, match="built on the sweep's optimizer"):
        wdjax.sweep(noisy, model=model, optimizer=opt, weight_decay=starts, epochs=1,
                    tuner=Tuner(wdjax.adamw(1e-2, 0.0)), progress=False)  # fmt: skip


def _two_groups(lr: float = 0.1):
    """One decoupled decay per group, each with its own injected λ."""

    def build(wd_kernel, wd_bias):
        return optax.chain(
            optax.adam(lr),
            wdjax.decoupled_weight_decay(wd_kernel, "dense/kernel", learning_rate=lr),
            wdjax.decoupled_weight_decay(wd_bias, "dense/bias", learning_rate=lr),
        )

    return optax.inject_hyperparams(build)(wd_kernel=0.01, wd_bias=0.02)


def test_per_group_lambdas_get_their_own_hypergradients():
    opt = _two_groups()
    tuner = Tuner(opt, name=("wd_kernel", "wd_bias"), learning_rate=0.5)
    state = opt.init(PARAMS)
    h = jax.jit(tuner.hypergradient)(GRADS, state, PARAMS, HELD)
    for i, (leaf, lam) in enumerate((("kernel", 0.01), ("bias", 0.02))):
        closed = -0.1 * lam * float(jnp.vdot(HELD["dense"][leaf], PARAMS["dense"][leaf]))
        assert float(h[i]) == pytest.approx(closed, rel=1e-5)
    t_state = tuner.init(state)
    assert t_state.log_rate.shape == (2,)
    t_state, new = tuner.step(t_state, GRADS, state, PARAMS, HELD, state)
    rates = tuner.rate(t_state)
    assert float(new.hyperparams["wd_kernel"]) == pytest.approx(float(rates[0]))
    assert float(new.hyperparams["wd_bias"]) == pytest.approx(float(rates[1]))
    assert np.all(np.sign(np.log(np.asarray(rates) / [0.01, 0.02])) == -np.sign(np.asarray(h)))


def test_fit_reports_each_group(noisy):
    model = models.create("mlp", input_shape=(8, 8, 1), widths=(32,))

    def build(wd_hidden, wd_head):
        return optax.chain(
            optax.adam(1e-2),
            wdjax.decoupled_weight_decay(wd_hidden, "dense0/kernel", lr_coupling="constant"),
            wdjax.decoupled_weight_decay(wd_head, "head/kernel", lr_coupling="constant"),
        )

    opt = optax.inject_hyperparams(build)(wd_hidden=1e-2, wd_head=1e-2)
    tuner = Tuner(opt, name=("wd_hidden", "wd_head"), learning_rate=0.1)
    result = train.fit(model, opt, noisy, epochs=2, batch_size=64, progress=False, tuner=tuner)
    last = result.history[-1]
    assert {"rate/wd_hidden", "rate/wd_head", "hypergradient/wd_head"} <= set(last)
    assert last["rate/wd_hidden"] != last["rate/wd_head"]


def test_neumann_vector_is_the_truncated_series():
    """For a quadratic training loss ½·θᵀAθ, `neumann=i` gives Σ_{j≤i}(I − αA)^j g."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4)).astype(np.float32)
    a = m @ m.T / 4 + np.eye(4, dtype=np.float32)
    g = rng.normal(size=4).astype(np.float32)
    opt = wdjax.adamw(0.1, 0.01, mask=masks.ALL)
    for i in (0, 1, 3):
        tuner = Tuner(opt, neumann=i, neumann_lr=0.1)
        got = tuner.neumann_vector({"w": jnp.asarray(g)}, lambda v: {"w": jnp.asarray(a) @ v["w"]})
        step = np.eye(4) - 0.1 * a
        want = sum(np.linalg.matrix_power(step, j) @ g for j in range(i + 1))
        np.testing.assert_allclose(got["w"], want, rtol=1e-5)
    with pytest.raises(ValueError, match="needs hvp"):
        Tuner(opt, neumann=2).hypergradient(GRADS, opt.init(PARAMS), PARAMS, HELD)


def test_fit_with_the_neumann_correction(noisy):
    model = models.create("mlp", input_shape=(8, 8, 1), widths=(32,))
    opt = wdjax.adamw(1e-2, 1e-2, lr_coupling="schedule", max_learning_rate=1e-2)
    tuner = Tuner(opt, learning_rate=0.1, neumann=2, neumann_lr=1e-2)
    result = train.fit(model, opt, noisy, epochs=2, batch_size=64, progress=False, tuner=tuner)
    assert all(np.isfinite(h["hypergradient"]) for h in result.history)
    assert result.history[-1]["weight_decay"] != pytest.approx(1e-2)


# ------------------------------------------------- forward mode (horizon > 1)


def _train_loss(params):
    """A non-quadratic training loss, so its Hessian changes along the run."""
    w, b = params["dense"]["kernel"], params["dense"]["bias"]
    return jnp.sum(jax.nn.softplus(w @ jnp.arange(1.0, 5.0) - 2.0)) + jnp.sum((b - 0.5) ** 4)


def _forward_run(tuner, steps: int, lam: float = 0.05):
    opt = tuner.optimizer
    state = wdjax.set_hyperparams(opt.init(PARAMS), weight_decay=lam)
    t_state, params = tuner.init(state, PARAMS), PARAMS
    for _ in range(steps):
        value_and_grad = jax.value_and_grad(_train_loss)
        _, _, updates, state, t_state = tuner.forward(t_state, value_and_grad, state, params)
        params = optax.apply_updates(params, updates)
    return params, t_state


@pytest.mark.parametrize(
    "build",
    [lambda: wdjax.adamw(0.1, 0.05), lambda: wdjax.adam_l2(0.1, 0.05, mask=masks.ALL)],
    ids=["adamw", "adam_l2"],
)
def test_forward_mode_is_the_derivative_of_the_whole_run(build):
    """`horizon=inf`: `⟨∇L_val, Z⟩` after k steps is `d⟨HELD, θ_k(λ)⟩/d log λ` of the
    k-step run (a linear held-out loss), Adam's moments included: a central difference."""
    tuner = Tuner(build(), horizon=math.inf)
    steps = 6
    params, t_state = _forward_run(tuner, steps)
    h = float(tuner.contract(t_state, HELD))

    def val(log_lam):
        opt = tuner.optimizer
        state = wdjax.set_hyperparams(opt.init(PARAMS), weight_decay=jnp.exp(log_lam))
        p = PARAMS
        for _ in range(steps):
            updates, state = opt.update(jax.grad(_train_loss)(p), state, p)
            p = optax.apply_updates(p, updates)
        return sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(HELD), jax.tree.leaves(p)))

    eps = 1e-2
    fd = (val(np.log(0.05) + eps) - val(np.log(0.05) - eps)) / (2 * eps)
    assert h != 0 and h == pytest.approx(fd, rel=2e-3)
    one_step = float(tuner.hypergradient(GRADS, tuner.optimizer.init(PARAMS), PARAMS, HELD))
    assert h != pytest.approx(one_step, rel=0.1)  # the run is not its last step


@pytest.mark.parametrize("horizon", [2.0, 10.0, math.inf])
def test_forward_mode_damps_the_tangent_by_one_minus_one_over_the_horizon(horizon):
    """SGD with decoupled decay on the quadratic `½Σaᵢwᵢ²`: `θ⁺ = (1 − η·a − η·λ)θ`, so
    `Z⁺ = (1 − η·a − η·λ)·μZ − η·λ·θ` with `μ = 1 − 1/H`, by hand."""
    a = jnp.array([0.5, 2.0, 4.0])
    lr, lam = 0.1, 0.05
    opt = wdjax.sgdw(lr, lam, mask=masks.ALL)
    tuner = Tuner(opt, horizon=horizon)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = opt.init(params)
    t_state = tuner.init(state, params)
    z, w, mu = np.zeros(3), np.asarray(params["w"]), 1 - 1 / horizon
    for _ in range(4):
        value_and_grad = jax.value_and_grad(lambda p: 0.5 * jnp.sum(a * p["w"] ** 2))
        _, _, updates, state, t_state = tuner.forward(t_state, value_and_grad, state, params)
        params = optax.apply_updates(params, updates)
        z, w = (
            (1 - lr * np.asarray(a) - lr * lam) * mu * z - lr * lam * w,
            (1 - lr * np.asarray(a) - lr * lam) * w,
        )
    np.testing.assert_allclose(t_state.tangent[0]["w"], z, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(params["w"], w, rtol=1e-5)


def test_forward_mode_tunes_one_lambda_per_group():
    """Several names: one tangent each (a leading axis), `h` per name equal to the
    single-name forward run that tunes that name alone."""
    opt = _two_groups()
    both = Tuner(opt, name=("wd_kernel", "wd_bias"), horizon=math.inf)
    state = opt.init(PARAMS)
    t_state, p = both.init(state, PARAMS), PARAMS
    alone = {n: Tuner(opt, name=n, horizon=math.inf) for n in both.names}
    singles = {n: (t.init(state, PARAMS), state, PARAMS) for n, t in alone.items()}
    value_and_grad = jax.value_and_grad(_train_loss)
    for _ in range(3):
        _, _, updates, state, t_state = both.forward(t_state, value_and_grad, state, p)
        p = optax.apply_updates(p, updates)
        for n, t in alone.items():
            ts, s, q = singles[n]
            _, _, u, s, ts = t.forward(ts, value_and_grad, s, q)
            singles[n] = (ts, s, optax.apply_updates(q, u))
    h = both.contract(t_state, HELD)
    assert h.shape == (2,)
    for i, (n, t) in enumerate(alone.items()):
        assert float(h[i]) == pytest.approx(float(t.contract(singles[n][0], HELD)), rel=1e-5)


def test_fit_and_sweep_with_forward_mode(noisy):
    """On the noisy digits (the benchmark's setting, one seed) the one-step hypergradient
    sinks λ to its floor while the whole-run one brings it back up, late, as training
    starts to fit the noise; vmapped in `sweep`, a member equals `fit`."""
    model = models.create("mlp", input_shape=(8, 8, 1), widths=(128,))
    opt = wdjax.adamw(1e-2, 1e-4, lr_coupling="schedule", max_learning_rate=1e-2)
    ends = {}
    for horizon in (1, math.inf):
        tuner = Tuner(opt, learning_rate=0.05, bounds=(1e-6, 1.0), horizon=horizon)
        result = train.fit(model, opt, noisy, epochs=60, batch_size=64, seed=1,
                           progress=False, tuner=tuner)  # fmt: skip
        assert all(np.isfinite(h["hypergradient"]) for h in result.history)
        ends[horizon] = result.history[-1]["weight_decay"]
    assert ends[1] < 1e-5 and ends[math.inf] > 3e-4
    found = wdjax.sweep(noisy, model=model, optimizer=opt, weight_decay=[1e-4, 1e-2],
                        epochs=2, batch_size=64, tuner=tuner, progress=False)  # fmt: skip
    alone = train.fit(model, opt, noisy, epochs=2, batch_size=64, progress=False, tuner=tuner)
    want = alone.history[-1]["weight_decay"]
    assert found.history["weight_decay"][0, -1] == pytest.approx(want, rel=1e-4)
