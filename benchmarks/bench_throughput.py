"""2. Training throughput (images/s): wdjax step (single and scanned) vs PyTorch."""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common
from benchmarks.timing import interleaved

TARGET = 1.0


def run(cfg: Any) -> dict[str, Any]:
    have_torch = common.torch_available()
    out: dict[str, Any] = {
        "what": f"images/s at batch {cfg.batch_size}, AdamW, no decay on biases. jax_step: one jitted "
        "library step per call (metrics included; what fit(scan=False) dispatches); jax_scan: train.run_steps "
        f"(one lax.scan over {cfg.scan_length} steps, as fit runs an epoch). The CNN is wdjax's, with wdjax.ops' "
        "convolution and max-pool. torch_eager / torch_compile: the same architecture in PyTorch (NCHW), "
        f"torch.set_num_threads({common.TORCH_THREADS}); torch_eager_1thread: one thread, for reference. The best "
        "PyTorch figure is the fastest of all torch contenders.",
        "target": f"best wdjax / best PyTorch >= {TARGET}",
        "torch_threads": common.TORCH_THREADS,
        "torch_compile": bool(have_torch and cfg.torch_compile),
        "models": {},
    }
    B, L = cfg.batch_size, cfg.scan_length
    for name in cfg.models:
        model = common.create_model(name)
        data = common.batch(B)
        opt = common.wdjax_optimizer
        contenders: dict[str, Any] = {  # contender -> (run, steps per call)
            "jax_step": (common.wdjax_step(model, opt(), data), 1),
            "jax_scan": (common.scanned_steps(model, opt(), B, L), L),
        }
        compile_s: dict[str, float] = {}
        if have_torch:
            kinds = [("torch_eager", False, common.TORCH_THREADS)]
            if cfg.torch_compile:
                kinds.append(("torch_compile", True, common.TORCH_THREADS))
            if not cfg.quick:  # for reference: on a loaded 2-core machine one thread can win
                kinds.append(("torch_eager_1thread", False, 1))
            for label, compiled, threads in kinds:
                fn = common.torch_step(name, data, compiled=compiled, threads=threads)
                t0 = time.perf_counter()
                fn()
                compile_s[label] = time.perf_counter() - t0
                contenders[label] = (fn, 1)
        steps_per_call = {k: v[1] for k, v in contenders.items()}
        # each timed sample covers about L steps (one call of a longer scan)
        calls = {k: max(1, L // v) for k, v in steps_per_call.items()}
        wrapped = {
            k: (lambda f=f, n=calls[k]: [f() for _ in range(n)]) for k, (f, _) in contenders.items()
        }
        res = interleaved(wrapped, rounds=cfg.throughput_rounds[name], warmup=1)
        table = {}
        for k, r in res.items():
            imgs = B * steps_per_call[k] * calls[k]
            table[k] = {
                **r,
                "images_per_s": imgs / r["median_s"],
                "images_per_s_q1": imgs / r["q3_s"],  # slower quartile
                "images_per_s_q3": imgs / r["q1_s"],
                "images_per_s_best": imgs / r["min_s"],
                "steps_per_sample": steps_per_call[k] * calls[k],
            }
        entry: dict[str, Any] = {"contenders": table, "first_call_s": compile_s}
        jax_best = max(("jax_step", "jax_scan"), key=lambda k: table[k]["images_per_s"])
        torch_names = [k for k in table if k.startswith("torch")]
        if torch_names:
            best_torch = max(torch_names, key=lambda k: table[k]["images_per_s"])
            tb = table[best_torch]["images_per_s"]
            entry["best_torch"] = best_torch
            entry["ratios"] = {
                f"{k}/{best_torch}": v["images_per_s"] / tb
                for k, v in table.items()
                if k.startswith("jax")
            }
            entry["best_jax"] = jax_best
            entry["ratio_library"] = table[jax_best]["images_per_s"] / tb
            entry["met"] = entry["ratio_library"] >= TARGET
        print(
            f"  throughput {name}: "
            + ", ".join(f"{k} {v['images_per_s']:.0f}/s" for k, v in table.items()),
            flush=True,
        )
        out["models"][name] = entry
    return out
