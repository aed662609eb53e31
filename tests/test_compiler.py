"""The lab's compile options (`wdjax.lab.compiler`): where they apply, and that the
lab's programs (fit's stretches, evaluation, sweep epochs) are compiled with them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from wdjax import masks, optimizers
from wdjax.lab import compiler, data, models, ops, sweeps, tasks, train

YNN_CONV = re.compile(r"= \S+ convolution\(")


@pytest.fixture
def fresh(monkeypatch):
    """`compiler.options()` decided anew for this test, and again after it."""
    compiler.options.cache_clear()
    yield monkeypatch
    compiler.options.cache_clear()


def _unknown_option(options):
    raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: No such compile option")


@pytest.mark.parametrize(
    "setup",
    [
        lambda mp: mp.setattr(jax, "default_backend", lambda: "gpu"),
        lambda mp: mp.setenv(
            "XLA_FLAGS", f"--{compiler.YNN_FUSION_TYPE}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
        ),
        lambda mp: mp.setattr(compiler, "_ynn_convolution", lambda options: False),
        lambda mp: mp.setattr(compiler, "_ynn_convolution", lambda options: True),
        lambda mp: mp.setattr(compiler, "_ynn_convolution", _unknown_option),
    ],
    ids=[
        "not CPU",
        "XLA_FLAGS chooses",
        "convolutions not on YNNPACK",
        "options leave them there",
        "options unknown to this jaxlib",
    ],
)
def test_no_options_where_they_do_not_apply(fresh, setup):
    setup(fresh)
    assert compiler.options() == {}


def _ynn_convolutions(jitted, *args, **kwargs) -> int:
    """Convolutions in YNNPACK fusions of `jitted`'s program for these arguments."""
    text = jitted.lower(*args, **kwargs).compile().as_text()
    ynn = set(re.findall(r"calls=%(\S+?),.*\"__ynn_fusion\"", text))
    bodies = re.split(r"\n(?=%)", text)
    return sum(1 for b in bodies if b[1:].split(" ", 1)[0] in ynn and YNN_CONV.search(b))


@pytest.fixture(scope="module")
def cnn_case():
    """The reference CNN on digits, its optimizer, a state and the data, or a skip where
    this jaxlib does not send convolutions to YNNPACK."""
    compiler.options.cache_clear()
    if not compiler.options():
        pytest.skip("this jaxlib does not send convolutions to YNNPACK: no options to apply")
    ds = data.load("digits")
    model = models.create("cnn", input_shape=ds.input_shape, num_classes=ds.num_classes)
    opt = optimizers.adamw(1e-3, 1e-4)
    return ds, tasks.as_task(model), opt, train.init_state(model, opt, jax.random.PRNGKey(0))


def test_the_options_take_convolutions_off_ynnpack(cnn_case):
    x, w, same = jnp.zeros((2, 8, 8, 32)), jnp.zeros((3, 3, 32, 32)), ((1, 1), (1, 1))
    plain = jax.jit(ops.conv2d, static_argnums=2)
    lab = jax.jit(ops.conv2d, static_argnums=2, compiler_options=compiler.options())
    assert _ynn_convolutions(plain, x, w, same) == 1
    assert _ynn_convolutions(lab, x, w, same) == 0


def _fit_stretch(ds, task, opt, state):
    step = train.make_train_step(task, opt, guard=False)
    runner = train._Runner(step, None, None, 64, False)
    runner(jax.tree.map(jnp.copy, state), ds.arrays("train"), 2)  # the runner donates it
    stretch = runner._jitted[("scan", 2)]
    plain = jax.jit(stretch.__wrapped__)
    return stretch, plain, (state, (ds.arrays("train"), None)), {}


def _evaluation(ds, task, opt, state):
    args = (task, state.params, state.model_state, ds.arrays("val"))
    kw = {"batch_size": 64}
    plain = jax.jit(tasks.evaluate, static_argnames=("task", "batch_size"))
    return train._evaluate(), plain, args, kw


def _sweep_epoch(ds, task, opt, state):
    _, epoch = sweeps._program(task, opt, 64, (), masks.DEFAULT)
    stacked = jax.tree.map(lambda a: jnp.stack([a] * 2), state)
    args = (stacked, ds.arrays("train"), None, ds.arrays("val"), None, 2)
    plain = jax.jit(epoch.__wrapped__, static_argnums=5)
    return epoch, plain, args, {}


@pytest.mark.parametrize("program", [_fit_stretch, _evaluation, _sweep_epoch])
def test_the_labs_programs_are_compiled_with_the_options(cnn_case, program):
    """Each program has no convolution on YNNPACK; the same function jitted plainly does."""
    lab, plain, args, kw = program(*cnn_case)
    assert _ynn_convolutions(plain, *args, **kw) > 0
    assert _ynn_convolutions(lab, *args, **kw) == 0
