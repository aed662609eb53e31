"""1. Overhead of wdjax: the library's full train step vs a hand-written Optax step."""

from __future__ import annotations

import re
from typing import Any

import jax

from benchmarks import common, proposals
from benchmarks.timing import interleaved, ratio
from wdjax import train

TARGET = 1.03


def big_copies(jitted: Any, *args: Any) -> int:
    """Non-scalar float32 ``copy`` instructions in the compiled entry computation (the
    ``jnp.where`` skip the library used before made XLA copy every Adam moment first)."""
    text = jitted.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    return len(re.findall(r"= f32\[\d[\d,]*\]\{[\d,]*\} copy\(", entry))


def run(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": f"per-step time, batch {cfg.batch_size}; wdjax_step = jit(train.make_train_step(model, "
        "wdjax.adamw(lr, wd, l1=...))), per-step metrics and the lax.cond skip of non-finite steps included; "
        "optax = hand-written step with optax.adamw(mask=kernels); wdjax_optimizer_minimal = the same "
        "hand-written step with wdjax.adamw(l1=...); wdjax_optimizer_minimal_skip = that step plus the library's guard "
        "against non-finite steps (gradient norm, update under lax.cond); wdjax_step_no_weight_metrics = the library step with the "
        "per-step weight norms and zero fraction dropped (benchmarks/proposals.py; a contrast, not in the library)",
        "target": f"wdjax_step / optax <= {TARGET}",
        "models": {},
    }
    for name in cfg.models:
        model = common.create_model(name)
        data = common.batch(cfg.batch_size)
        contenders = {
            "optax": common.minimal_step(model, common.optax_adamw(model), data),
            "wdjax_optimizer_minimal": common.minimal_step(model, common.wdjax_optimizer(), data),
            "wdjax_optimizer_minimal_skip": common.minimal_step(
                model, common.wdjax_optimizer(), data, skip=True
            ),
            "wdjax_step": common.wdjax_step(model, common.wdjax_optimizer(), data),
            "wdjax_step_no_weight_metrics": common.wdjax_step(
                model,
                common.wdjax_optimizer(),
                data,
                make_step=proposals.make_train_step_without_weight_metrics,
            ),
        }
        res = interleaved(
            contenders, rounds=cfg.overhead_rounds[name], number=cfg.overhead_number[name]
        )
        ratios = {
            "wdjax_step/optax": ratio(res, "wdjax_step", "optax"),
            "wdjax_step/wdjax_optimizer_minimal": ratio(
                res, "wdjax_step", "wdjax_optimizer_minimal"
            ),
            "wdjax_optimizer_minimal/optax": ratio(res, "wdjax_optimizer_minimal", "optax"),
            "wdjax_optimizer_minimal_skip/optax": ratio(
                res, "wdjax_optimizer_minimal_skip", "optax"
            ),
            "wdjax_step_no_weight_metrics/optax": ratio(
                res, "wdjax_step_no_weight_metrics", "optax"
            ),
            "wdjax_step/wdjax_step_no_weight_metrics": ratio(
                res, "wdjax_step", "wdjax_step_no_weight_metrics"
            ),
        }
        ratios_min = {k: ratio(res, *k.split("/"), key="min_s") for k in ratios}
        entry: dict[str, Any] = {
            "contenders": res,
            "ratios": ratios,
            "ratios_min": ratios_min,
            "met": ratios["wdjax_step/optax"] <= TARGET,
        }
        if not cfg.quick:
            state = train.init_state(model, common.wdjax_optimizer(), jax.random.PRNGKey(0))
            step = jax.jit(train.make_train_step(model, common.wdjax_optimizer()), donate_argnums=0)
            entry["compiled_copies"] = big_copies(step, state, jax.device_put(data))
        out["models"][name] = entry
        print(
            f"  overhead {name}: wdjax_step/optax {ratios['wdjax_step/optax']:.3f} (min-based {ratios_min['wdjax_step/optax']:.3f}), "
            f"step/minimal {ratios['wdjax_step/wdjax_optimizer_minimal']:.3f}, optimizer {ratios['wdjax_optimizer_minimal/optax']:.3f}, "
            f"no weight metrics/optax {ratios['wdjax_step_no_weight_metrics/optax']:.3f}",
            flush=True,
        )
    return out
