"""5. Compile time of the train step, and recompilations when λ or η change."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import wdjax
from benchmarks import common
from wdjax import train


def _lower_compile(fn: Any, *args: Any) -> tuple[float, float]:
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def compile_times(name: str, cfg: Any) -> dict[str, Any]:
    model = common.create_model(name)
    data = jax.device_put(common.batch(cfg.batch_size))
    opt = common.wdjax_optimizer()
    state = train.init_state(model, opt, jax.random.PRNGKey(0))
    params, model_state = model.init(jax.random.PRNGKey(0))
    oopt = common.optax_adamw(model)
    L = cfg.scan_length
    xs = (
        jnp.zeros((cfg.batch_size * L, *common.INPUT_SHAPE)),
        jnp.zeros((cfg.batch_size * L,), jnp.int32),
    )

    def optax_step(p, s, x, y):
        def loss_fn(p):
            logits, _ = model.apply(p, model_state, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = oopt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    out: dict[str, Any] = {}
    makers = {
        "wdjax_step": lambda: (
            jax.jit(train.make_train_step(model, opt), donate_argnums=0),
            (state, data),
        ),
        "wdjax_scan": lambda: (
            jax.jit(
                functools.partial(train.run_steps, train.make_train_step(model, opt)),
                static_argnums=(3, 4),
                donate_argnums=0,
            ),
            (state, *xs, cfg.batch_size, L),
        ),
        "optax_step": lambda: (
            jax.jit(optax_step, donate_argnums=(0, 1)),
            (params, oopt.init(params), data["x"], data["y"]),
        ),
    }
    if cfg.quick:
        del makers["wdjax_scan"]
    for label, make in makers.items():
        lower, comp = [], []
        for _ in range(cfg.compile_repeats):
            fn, args = make()  # a fresh function each time: no tracing cache
            a, b = _lower_compile(fn, *args)
            lower.append(a)
            comp.append(b)
        out[label] = {
            "trace_lower_s": statistics.median(lower),
            "compile_s": statistics.median(comp),
            "total_s": statistics.median([a + b for a, b in zip(lower, comp)]),
            "repeats": cfg.compile_repeats,
        }
    if name == "cnn":
        out["what_scan"] = f"wdjax_scan: run_steps over {L} steps"
    return out


def recompilations(cfg: Any) -> dict[str, Any]:
    """Change λ and η between calls of one jitted step; count the jit cache entries."""
    model = common.create_model("mlp")
    data = jax.device_put(common.batch(cfg.batch_size))
    opt = common.wdjax_optimizer()
    step = jax.jit(train.make_train_step(model, opt), donate_argnums=0)
    state = train.init_state(model, opt, jax.random.PRNGKey(0))
    state, _ = step(state, data)
    base = step._cache_size()
    values = [(2e-3, 1e-3), (5e-4, 3e-2), (1e-3, 0.0), (3e-4, 1e-5)][: 2 if cfg.quick else 4]
    seen_ok = True
    times = []
    for lr, wd in values:  # Python floats, as a user writes them
        s = wdjax.set_hyperparams(state.opt_state, weight_decay=wd, learning_rate=lr)
        t0 = time.perf_counter()
        state, m = step(state._replace(opt_state=s), data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        seen_ok &= bool(jnp.isclose(m["learning_rate"], lr)) and bool(
            jnp.isclose(m["weight_decay"], wd)
        )
    wdjax_set = step._cache_size() - base
    # contrast: optax's tree_set with Python floats stores weakly typed scalars, a new input type
    before = step._cache_size()
    for lr, wd in values:
        s = optax.tree_utils.tree_set(state.opt_state, weight_decay=wd, learning_rate=lr)
        state, m = step(state._replace(opt_state=s), data)
    jax.block_until_ready(m)
    tree_set_py = step._cache_size() - before

    # contrast: optax.adamw re-created with each λ, passed to one jitted step as static
    params, model_state = model.init(jax.random.PRNGKey(0))
    mask = common.kernel_mask(params)

    def loss_fn(p, x, y):
        logits, _ = model.apply(p, model_state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @functools.partial(jax.jit, static_argnums=4)
    def ostep(p, s, x, y, o):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = o.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    o = optax.adamw(1e-3, weight_decay=1e-4, mask=mask)
    s = o.init(params)
    params, s, _ = ostep(params, s, data["x"], data["y"], o)
    obase = ostep._cache_size()
    otimes = []
    for lr, wd in values:
        o = optax.adamw(lr, weight_decay=wd, mask=mask)
        t0 = time.perf_counter()
        params, s, loss = ostep(params, s, data["x"], data["y"], o)
        jax.block_until_ready(loss)
        otimes.append(time.perf_counter() - t0)
    return {
        "changes": len(values),
        "wdjax_set_hyperparams_recompiles": wdjax_set,
        "tree_set_python_floats_recompiles": tree_set_py,
        "wdjax_values_seen_in_metrics": seen_ok,
        "wdjax_call_after_change_s": statistics.median(times),
        "optax_recreated_recompiles": ostep._cache_size() - obase,
        "optax_call_after_change_s": statistics.median(otimes),
        "target": "wdjax_set_hyperparams_recompiles == 0",
        "met": wdjax_set == 0,
    }


def run(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": "trace+lower and XLA compile time (median of repeats, fresh functions); "
        "recompilations of one jitted MLP step when wdjax.set_hyperparams changes weight_decay and "
        "learning_rate (Python floats) between calls; contrasts: optax.tree_utils.tree_set with the same "
        "Python floats, and optax.adamw re-created per λ (a static argument).",
        "models": {name: compile_times(name, cfg) for name in cfg.models},
    }
    out["recompilation"] = recompilations(cfg)
    for name, r in out["models"].items():
        print(
            f"  compile {name}: "
            + ", ".join(f"{k} {v['total_s']:.2f}s" for k, v in r.items() if isinstance(v, dict)),
            flush=True,
        )
    rc = out["recompilation"]
    print(
        f"  recompiles: set_hyperparams {rc['wdjax_set_hyperparams_recompiles']}, tree_set floats {rc['tree_set_python_floats_recompiles']}, "
        f"optax re-created {rc['optax_recreated_recompiles']}",
        flush=True,
    )
    return out
