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
from benchmarks.report import code, num, table, yes
from benchmarks.timing import log
from wdjax.lab import train

TITLE = "5. Compile time and recompilations"


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
    epoch = jax.device_put(common.batch(cfg.batch_size, n=cfg.batch_size * L))

    out: dict[str, Any] = {}
    makers = {
        "wdjax_step": lambda: (
            common.jit(train.make_train_step(model, opt), donate_argnums=0),
            (state, data),
        ),
        "wdjax_scan": lambda: (
            common.jit(
                functools.partial(train.run_steps, train.make_train_step(model, opt)),
                static_argnums=(2, 3),
                donate_argnums=0,
            ),
            (state, epoch, cfg.batch_size, L),
        ),
        "optax_step": lambda: (
            common.jit(common.hand_step(model, model_state, oopt), donate_argnums=(0, 1)),
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
    return out


def recompilations(cfg: Any) -> dict[str, Any]:
    """Change λ and η between calls of one jitted step; count the jit cache entries."""
    model = common.create_model("mlp")
    data = jax.device_put(common.batch(cfg.batch_size))
    opt = common.wdjax_optimizer()
    step = common.jit(train.make_train_step(model, opt), donate_argnums=0)
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

    def ostep(p, s, x, y, o):
        return common.hand_step(model, model_state, o)(p, s, x, y)

    ostep = common.jit(ostep, static_argnums=4)

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
        "what": "trace+lower and XLA compile time (median of repeats, fresh functions; "
        f"wdjax_scan: run_steps over {cfg.scan_length} steps); recompilations of one jitted MLP "
        "step when wdjax.set_hyperparams changes weight_decay and learning_rate (Python floats) "
        "between calls; contrasts: optax.tree_utils.tree_set with the same Python floats, and "
        "optax.adamw re-created per λ (a static argument).",
        "models": {name: compile_times(name, cfg) for name in cfg.models},
        "recompilation": recompilations(cfg),
    }
    for name, r in out["models"].items():
        log(f"compile {name}, total s", r, lambda v: num(v["total_s"], ".2f"))
    log("recompiles", {k: v for k, v in out["recompilation"].items() if "recompiles" in k}, str)
    return out


def summary(s: dict[str, Any]) -> list[list[str]]:
    rc = s["recompilation"]
    return [
        [
            f"5. recompilations after {rc['changes']} changes of λ, η with `wdjax.set_hyperparams`",
            str(rc["wdjax_set_hyperparams_recompiles"]),
            "0",
            yes(rc["met"]),
        ]
    ]


def render(s: dict[str, Any]) -> str:
    rows = [
        [
            name.upper(),
            code(k),
            *(num(r[t], ".2f") for t in ("trace_lower_s", "compile_s", "total_s")),
        ]
        for name, e in s["models"].items()
        for k, r in e.items()
        if isinstance(r, dict)  # runs before 2026-11-24 also stored a "what_scan" string
    ]
    rc = s["recompilation"]
    return "\n\n".join(
        [
            f"## {TITLE}",
            s["what"],
            table(["model", "function", "trace+lower s", "compile s", "total s"], rows),
            f"Recompilations over {rc['changes']} changes of (λ, η) between calls of one jitted "
            "step:",
            "* `wdjax.set_hyperparams(opt_state, weight_decay=λ, learning_rate=η)` with Python "
            f"floats: **{rc['wdjax_set_hyperparams_recompiles']}** (target 0; the new values show "
            f"up in the step's metrics: {rc['wdjax_values_seen_in_metrics']}); call after a "
            f"change {num(rc['wdjax_call_after_change_s'] * 1e3, '.1f')} ms\n"
            "* contrast, `optax.tree_utils.tree_set` with the same Python floats: "
            f"**{rc['tree_set_python_floats_recompiles']}** (it stores weakly typed scalars, a "
            "new input type for `jit`: one extra compile, then cached; `set_hyperparams` casts "
            "to float32)\n"
            "* contrast, `optax.adamw` re-created with each λ (a static argument): "
            f"**{rc['optax_recreated_recompiles']}** recompiles; call after a change "
            f"{num(rc['optax_call_after_change_s'] * 1e3, '.0f')} ms",
        ]
    )
