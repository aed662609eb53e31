"""2. Training throughput (images/s): wdjax step (single and scanned) vs PyTorch."""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common
from benchmarks.report import code, num, table, yes
from benchmarks.timing import WARM_S, interleaved, log, warm

TITLE = "2. Training throughput vs PyTorch"
TARGET = 1.0


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(cfg: Any) -> dict[str, Any]:
    device, no_peer = common.torch_device()
    # OpenMP's wait policy is a CPU matter: beside a GPU, PyTorch runs as it comes
    policies = {"": "default", "PASSIVE": "passive"} if device == "cpu" else {"": "default"}
    out: dict[str, Any] = {
        "what": f"images/s at batch {cfg.batch_size}, AdamW, no decay on biases, every step on "
        f"a fresh batch drawn from the same {cfg.scan_length} batches of data. jax_scan: "
        f"train.run_steps (one lax.scan over {cfg.scan_length} steps, as fit runs an epoch; "
        "the CNN with wdjax.lab.ops' convolution and max-pool; compiled with the lab's options, "
        "wdjax.lab.compiler). torch_*: the same architecture "
        "in PyTorch (NCHW), eager or torch.compile, "
        f"torch.set_num_threads({common.TORCH_THREADS}), each in a process of its own with "
        "PyTorch's default OpenMP wait policy (active spinning: fastest on idle cores, "
        "collapses when another process holds a core) or OMP_WAIT_POLICY=PASSIVE (threads "
        "sleep: robust on shared cores, slower on idle ones); each worker times its own "
        "steps, and its threads get 50 ms to settle before the next contender. Every "
        f"sample is untimed calls for {WARM_S * 1000:.0f} ms (at least one), then one timed "
        "call of the same length, on every side: a contender idle during the others' turns "
        "comes back slowly (after 0.4 s idle XLA's 6-step MLP call ran at 31k img/s behind "
        "one untimed call and 45k behind six; torch.compile's at 40k behind one), and in "
        "training the steps run back to back. The best "
        "PyTorch figure, the fastest of all, is the reference. Roofline: XLA's FLOP count of "
        "one step times steps/s, over the machine's matmul peak: the faster of XLA's and "
        "PyTorch's 2048² f32 matmul, each a contender in the same rounds, one product a "
        "sample after the same warm-up, its best round (a peak measured once, apart, moved "
        "by 2× between runs on this shared VM, and a median peak sinks with the neighbours' "
        "load). A train step of small layers cannot reach it, so the fraction says how far "
        "from the compute limit each one is.",
        "target": f"best wdjax / best PyTorch >= {TARGET}",
        "torch_threads": common.TORCH_THREADS,
        "torch_device": device,
        "torch_missing": no_peer,
        "torch_compile": bool(device and cfg.torch_compile),
        "models": {},
    }
    workers: dict[str, Any] = {}
    if device:
        compiles = (False, True) if cfg.torch_compile else (False,)
        for compiled, policy in ((c, p) for c in compiles for p in policies):
            label = f"torch_{'compile' if compiled else 'eager'}_{policies[policy]}"
            workers[label] = (common.TorchWorker(policy), compiled)
    try:
        for name in cfg.models:
            out["models"][name] = _one_model(cfg, name, workers, device)
    finally:
        for w, _ in workers.values():
            w.close()
    return out


def _one_model(cfg: Any, name: str, workers: dict, device: str | None) -> dict[str, Any]:
    B, L = cfg.batch_size, cfg.scan_length
    model = common.create_model(name)
    opt = common.wdjax_optimizer
    scan = common.scanned_steps(model, opt(), B, L)
    # each sample: untimed calls for WARM_S (a contender idle during the others' turns
    # comes back slowly), then one timed call
    matmul = common.matmul_call()
    contenders: dict[str, Any] = {
        "jax_scan": lambda: (warm(scan, WARM_S), _timed(scan))[1],
        "peak_xla": lambda: (warm(matmul, WARM_S), _timed(matmul))[1],
    }
    if workers:  # the peak's PyTorch probe: its first worker (default OpenMP policy)
        probe = next(iter(workers.values()))[0]
        contenders["peak_torch"] = lambda: probe.ask(matmul=True, device=device,
                                                      warm_s=WARM_S)["seconds"]  # fmt: skip
    first_call: dict[str, float] = {}
    for label, (worker, compiled) in workers.items():
        got = worker.ask(model=name, batch_size=B, length=L, compiled=compiled,
                         threads=common.TORCH_THREADS, device=device)  # fmt: skip
        first_call[label] = got["first_call_s"]
        contenders[label] = lambda w=worker: w.ask(steps=L, warm_s=WARM_S)["seconds"]
    res = interleaved(contenders, rounds=cfg.throughput_rounds[name], warmup=1, self_timed=True)
    peaks = {k: res.pop(k) for k in ("peak_xla", "peak_torch") if k in res}
    for r in peaks.values():  # a ceiling: the best round (a median sinks with the load)
        r["gflops"] = common.PEAK_FLOP / r["min_s"] / 1e9
    peak_gflops = max(r["gflops"] for r in peaks.values())
    flops = common.step_flops(model, opt(), common.batch(B))
    per_s = {}
    for k, r in res.items():
        imgs = B * L
        per_s[k] = {
            **r,
            "images_per_s": imgs / r["median_s"],
            "images_per_s_q1": imgs / r["q3_s"],  # slower quartile
            "images_per_s_q3": imgs / r["q1_s"],
            "images_per_s_best": imgs / r["min_s"],
            "steps_per_sample": L,
            "gflops": flops * L / r["median_s"] / 1e9,
            "fraction_of_peak": flops * L / r["median_s"] / 1e9 / peak_gflops,
        }
    entry: dict[str, Any] = {"contenders": per_s, "first_call_s": first_call,
                             "step_gflop": flops / 1e9, "peak": peaks,
                             "peak_gflops": peak_gflops}  # fmt: skip
    torch_names = [k for k in per_s if k.startswith("torch")]
    if torch_names:
        best_torch = max(torch_names, key=lambda k: per_s[k]["images_per_s"])
        tb = per_s[best_torch]["images_per_s"]
        entry["best_torch"] = best_torch
        entry["best_jax"] = "jax_scan"
        entry["ratios"] = {f"jax_scan/{k}": per_s["jax_scan"]["images_per_s"] /
                           per_s[k]["images_per_s"] for k in torch_names}  # fmt: skip
        entry["ratio_library"] = per_s["jax_scan"]["images_per_s"] / tb
        entry["met"] = entry["ratio_library"] >= TARGET
    log(f"throughput {name}, images/s", per_s, lambda v: num(v["images_per_s"], ".0f"))
    return entry


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
            num(r.get("gflops"), ".1f"),
            num(r.get("fraction_of_peak"), ".2f"),
            num(r["images_per_s"] / best["images_per_s"]) if best else "–",
        ]
        for k, r in e["contenders"].items()
    ]


PEAK_NAMES = {"peak_xla": "XLA", "peak_torch": "PyTorch"}


def _gflops(r: dict[str, Any]) -> str:
    """``best 293.1 GFLOP/s (median 270.2, IQR 250.2–281.5)`` of a 2048² matmul's rounds."""
    f = common.PEAK_FLOP / 1e9
    return (
        f"best {num(r['gflops'], '.1f')} GFLOP/s (median {num(f / r['median_s'], '.1f')}, "
        f"IQR {num(f / r['q3_s'], '.1f')}–{num(f / r['q1_s'], '.1f')})"
    )


def render(s: dict[str, Any]) -> str:
    out = [f"## {TITLE}", s["what"], f"Target: {s['target']}."]
    if s.get("torch_missing"):
        out.append(f"No PyTorch contender in this run: {s['torch_missing']}.")
    elif s.get("torch_device") not in (None, "cpu"):
        out.append(
            f"PyTorch ran on `{s['torch_device']}` (fused AdamW, TF32 matmuls as JAX's "
            "default precision on a GPU), with its default OpenMP settings only: the wait "
            "policy concerns CPU threads."
        )
    if not s.get("torch_compile"):
        out.append("(`torch.compile` skipped in this run.)")
    for name, e in s["models"].items():
        head = ["contender", "images/s (median)", "IQR", "best round", "rounds", "GFLOP/s",
                "of peak"]  # fmt: skip
        out += [f"### {name.upper()}", table([*head, f"× `{e.get('best_torch')}`"], _rows(e))]
        if "step_gflop" in e:
            out.append(f"One train step: {num(e['step_gflop'], '.3f')} GFLOP (XLA's count).")
        if e.get("peak"):
            out.append(
                "Peak in the same rounds (2048² f32 matmul): "
                + ", ".join(f"{PEAK_NAMES[k]} {_gflops(r)}" for k, r in e["peak"].items())
                + f"; the roofline column divides by {num(e['peak_gflops'], '.1f')} GFLOP/s."
            )
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
