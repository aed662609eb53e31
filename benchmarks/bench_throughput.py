"""2. Training throughput (images/s): wdjax step (single and scanned) vs PyTorch."""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common, proposals
from benchmarks.timing import interleaved

TARGET = 1.0


def run(cfg: Any) -> dict[str, Any]:
    have_torch = common.torch_available()
    out: dict[str, Any] = {
        "what": f"images/s at batch {cfg.batch_size}, AdamW, no decay on biases. jax_step: one jitted "
        "library step per call (metrics included); jax_scan: train.run_steps (lax.scan, as fit) over "
        f"{cfg.scan_length} steps (the library CNN: 2, it is slow); *_fast: the CNN with benchmarks/proposals.py's "
        "strided max-pool and conv with a canonical backward (FastPoolCNN(pool='strided', layout='canonical')); "
        "*_proposed: with the proposed train step as well. torch_eager / torch_compile: same architecture in "
        f"PyTorch (NCHW), torch.set_num_threads({common.TORCH_THREADS}); torch_eager_1thread: one thread, "
        "for reference. The best PyTorch figure is the fastest of all torch contenders.",
        "target": f"best JAX (library as is) / best PyTorch >= {TARGET}",
        "torch_threads": common.TORCH_THREADS,
        "torch_compile": bool(have_torch and cfg.torch_compile),
        "models": {},
    }
    B, L = cfg.batch_size, cfg.scan_length
    for name in cfg.models:
        model = common.create_model(name)
        data = common.batch(B)
        opt = common.wdjax_optimizer
        # contender -> (run, steps per call); the library CNN's scan is slow (see below): short
        lib_len = L if name == "mlp" or cfg.quick else 2
        contenders: dict[str, Any] = {
            "jax_step": (common.wdjax_step(model, opt(), data), 1),
            "jax_scan": (common.scanned_steps(model, opt(), B, lib_len), lib_len),
        }
        if name == "cnn":
            fast = proposals.FastPoolCNN(model, pool="strided", layout="canonical")
            contenders["jax_step_fast"] = (common.wdjax_step(fast, opt(), data), 1)
            contenders["jax_scan_fast"] = (common.scanned_steps(fast, opt(), B, L), L)
            if not cfg.quick:
                contenders["jax_scan_fast_proposed"] = (
                    common.scanned_steps(fast, opt(), B, L, make_step=proposals.make_train_step_proposed), L)
        elif not cfg.quick:
            contenders["jax_scan_proposed"] = (
                common.scanned_steps(model, opt(), B, L, make_step=proposals.make_train_step_proposed), L)
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
        wrapped = {k: (lambda f=f, n=calls[k]: [f() for _ in range(n)]) for k, (f, _) in contenders.items()}
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
        jax_lib = max(table[k]["images_per_s"] for k in ("jax_step", "jax_scan"))
        jax_any = max(v["images_per_s"] for k, v in table.items() if k.startswith("jax"))
        torch_names = [k for k in table if k.startswith("torch")]
        if torch_names:
            best_torch = max(torch_names, key=lambda k: table[k]["images_per_s"])
            tb = table[best_torch]["images_per_s"]
            entry["best_torch"] = best_torch
            entry["ratios"] = {f"{k}/{best_torch}": v["images_per_s"] / tb for k, v in table.items() if k.startswith("jax")}
            entry["ratio_library"] = jax_lib / tb
            entry["ratio_best_jax"] = jax_any / tb
            entry["met"] = entry["ratio_library"] >= TARGET
            entry["met_with_proposals"] = entry["ratio_best_jax"] >= TARGET
        print(f"  throughput {name}: " + ", ".join(f"{k} {v['images_per_s']:.0f}/s" for k, v in table.items()), flush=True)
        out["models"][name] = entry
    return out
