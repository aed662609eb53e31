"""1. Overhead of wdjax: the library's full train step vs a hand-written Optax step."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax

from benchmarks import common, proposals
from benchmarks.timing import interleaved, ratio
from wdjax import train

TARGET = 1.03


def _big_copies(jitted: Any, *args: Any) -> int:
    """Non-scalar ``copy`` instructions in the compiled entry computation."""
    text = jitted.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return len(re.findall(r"= f32\[\d[\d,]*\]\{[\d,]*\} copy\(", entry))


def run(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": f"per-step time, batch {cfg.batch_size}; wdjax_step = jit(make_train_step(model, wdjax.adamw(lr, wd, l1=...))) "
        "with per-step metrics; optax = hand-written step with optax.adamw(mask=kernels); "
        "wdjax_optimizer_minimal = the same hand-written step with wdjax.adamw(l1=...); "
        "wdjax_step_proposed = benchmarks/proposals.py's make_train_step_proposed (lax.cond skip, float32 zero "
        "count); *_no_weight_metrics: the same without the per-step weight norms / zero fraction",
        "target": f"wdjax_step / optax <= {TARGET}",
        "models": {},
    }
    for name in cfg.models:
        model = common.create_model(name)
        data = common.batch(cfg.batch_size)
        contenders = {
            "optax": common.minimal_step(model, common.optax_adamw(model), data),
            "wdjax_optimizer_minimal": common.minimal_step(model, common.wdjax_optimizer(), data),
            "wdjax_step": common.wdjax_step(model, common.wdjax_optimizer(), data),
            "wdjax_step_proposed": common.wdjax_step(
                model, common.wdjax_optimizer(), data, make_step=proposals.make_train_step_proposed
            ),
        }
        if not cfg.quick:
            contenders["wdjax_step_proposed_no_weight_metrics"] = common.wdjax_step(
                model, common.wdjax_optimizer(), data,
                make_step=functools.partial(proposals.make_train_step_proposed, weight_metrics=False),
            )
        res = interleaved(contenders, rounds=cfg.overhead_rounds[name], number=cfg.overhead_number[name])
        ratios = {
            "wdjax_step/optax": ratio(res, "wdjax_step", "optax"),
            "wdjax_step/wdjax_optimizer_minimal": ratio(res, "wdjax_step", "wdjax_optimizer_minimal"),
            "wdjax_optimizer_minimal/optax": ratio(res, "wdjax_optimizer_minimal", "optax"),
            "wdjax_step_proposed/optax": ratio(res, "wdjax_step_proposed", "optax"),
            "wdjax_step_proposed/wdjax_step": ratio(res, "wdjax_step_proposed", "wdjax_step"),
        }
        if "wdjax_step_proposed_no_weight_metrics" in res:
            ratios["wdjax_step_proposed_no_weight_metrics/optax"] = ratio(res, "wdjax_step_proposed_no_weight_metrics", "optax")
        ratios_min = {k: ratio(res, *k.split("/"), key="min_s") for k in ratios}
        entry: dict[str, Any] = {
            "contenders": res,
            "ratios": ratios,
            "ratios_min": ratios_min,
            "met": ratios["wdjax_step/optax"] <= TARGET,
            "met_proposed": ratios["wdjax_step_proposed/optax"] <= TARGET,
        }
        if not cfg.quick:
            entry["proposed_max_abs_diff"] = proposals.check_same(model, common.wdjax_optimizer(), common.batch(16), steps=2)
            state = contenders["wdjax_step"].box[0]
            b = jax.device_put(data)
            entry["compiled_copies"] = {
                "wdjax_step": _big_copies(jax.jit(train.make_train_step(model, common.wdjax_optimizer()), donate_argnums=0), state, b),
                "wdjax_step_proposed": _big_copies(jax.jit(proposals.make_train_step_proposed(model, common.wdjax_optimizer()), donate_argnums=0), state, b),
            }
        out["models"][name] = entry
        print(f"  overhead {name}: wdjax_step/optax {ratios['wdjax_step/optax']:.3f} (min-based {ratios_min['wdjax_step/optax']:.3f}), "
              f"metrics {ratios['wdjax_step/wdjax_optimizer_minimal']:.3f}, optimizer {ratios['wdjax_optimizer_minimal/optax']:.3f}, "
              f"proposed/optax {ratios['wdjax_step_proposed/optax']:.3f}", flush=True)
    return out
