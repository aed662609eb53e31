"""2. Training throughput (images/s): wdjax step (single and scanned) vs PyTorch."""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common
from benchmarks.report import code, num, table, yes
from benchmarks.timing import interleaved, log

TITLE = "2. Training throughput vs PyTorch"
TARGET = 1.0


def run(cfg: Any) -> dict[str, Any]:
    have_torch = common.torch_available()
    out: dict[str, Any] = {
        "what": f"images/s at batch {cfg.batch_size}, AdamW, no decay on biases. jax_step: one "
        "jitted library step per call (metrics included; what fit(scan=False) dispatches); "
        f"jax_scan: train.run_steps (one lax.scan over {cfg.scan_length} steps, as fit runs an "
        "epoch). The CNN is wdjax's, with wdjax.lab.ops' convolution and max-pool. torch_eager / "
        "torch_compile: the same architecture in PyTorch (NCHW), "
        f"torch.set_num_threads({common.TORCH_THREADS}); torch_eager_1thread: one thread, for "
        "reference. The best PyTorch figure is the fastest of all torch contenders.",
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
        per_s = {}
        for k, r in res.items():
            imgs = B * steps_per_call[k] * calls[k]
            per_s[k] = {
                **r,
                "images_per_s": imgs / r["median_s"],
                "images_per_s_q1": imgs / r["q3_s"],  # slower quartile
                "images_per_s_q3": imgs / r["q1_s"],
                "images_per_s_best": imgs / r["min_s"],
                "steps_per_sample": steps_per_call[k] * calls[k],
            }
        entry: dict[str, Any] = {"contenders": per_s, "first_call_s": compile_s}
        jax_best = max(("jax_step", "jax_scan"), key=lambda k: per_s[k]["images_per_s"])
        torch_names = [k for k in per_s if k.startswith("torch")]
        if torch_names:
            best_torch = max(torch_names, key=lambda k: per_s[k]["images_per_s"])
            tb = per_s[best_torch]["images_per_s"]
            entry["best_torch"] = best_torch
            entry["ratios"] = {
                f"{k}/{best_torch}": v["images_per_s"] / tb
                for k, v in per_s.items()
                if k.startswith("jax")
            }
            entry["best_jax"] = jax_best
            entry["ratio_library"] = per_s[jax_best]["images_per_s"] / tb
            entry["met"] = entry["ratio_library"] >= TARGET
        log(f"throughput {name}, images/s", per_s, lambda v: num(v["images_per_s"], ".0f"))
        out["models"][name] = entry
    return out


def summary(s: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"2. throughput, {name.upper()}: best wdjax (`{e['best_jax']}`) / best PyTorch "
            f"(`{e['best_torch']}`)",
            num(e["ratio_library"]),
            f"≥ {TARGET}",
            yes(e["met"]),
        ]
        for name, e in s["models"].items()
        if "ratio_library" in e
    ]


def _rows(e: dict[str, Any]) -> list[list[str]]:
    best = e["contenders"].get(e.get("best_torch"))
    return [
        [
            code(k),
            num(r["images_per_s"], ".0f"),
            f"{num(r['images_per_s_q1'], '.0f')}–{num(r['images_per_s_q3'], '.0f')}",
            num(r["images_per_s_best"], ".0f"),
            str(r["rounds"]),
            num(r["images_per_s"] / best["images_per_s"]) if best else "–",
        ]
        for k, r in e["contenders"].items()
    ]


def render(s: dict[str, Any]) -> str:
    out = [f"## {TITLE}", s["what"], f"Target: {s['target']}."]
    if not s.get("torch_compile"):
        out.append("(`torch.compile` skipped in this run.)")
    for name, e in s["models"].items():
        head = ["contender", "images/s (median)", "IQR", "best round", "rounds"]
        out += [f"### {name.upper()}", table([*head, f"× `{e.get('best_torch')}`"], _rows(e))]
        if e.get("first_call_s"):
            out.append(
                "First call (PyTorch compile / warm-up): "
                + ", ".join(f"{k} {t:.1f} s" for k, t in e["first_call_s"].items())
                + "."
            )
        if e.get("met") is False:
            out.append(
                f"**Open:** best wdjax / best PyTorch {num(e['ratio_library'])} "
                f"(`{e['best_jax']}` vs `{e['best_torch']}`; target ≥ {TARGET})."
                + (" Where the CNN's time goes: section 6." if name == "cnn" else "")
            )
    return "\n\n".join(out)
