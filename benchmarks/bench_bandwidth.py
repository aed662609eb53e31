"""3. Optimizer update bandwidth: one AdamW + masked decay update on N float32 params,
in place (donated), vs an in-place copy of the same number of bytes in the same run.

Bytes counted per parameter: read params, grads, mu, nu (16 B); write params, mu, nu
(12 B): 28 B. The copy reads and writes 4 B per float, so it copies 3.5·N floats. The
few scalars (step counts, hyperparameters) are not counted. ``same_streams`` moves the
same 28 B a parameter in AdamW's pattern (four arrays read, three written back in
place) with one add each. The ``native_*`` contenders run the copy, that pattern and
AdamW itself as one fused loop each outside XLA (``benchmarks/streams.c``, built with
the system C compiler and OpenMP, one process beside this one, in the same rounds): the
roofline for this access pattern on this machine. For each XLA program, XLA's own cost
analysis gives the bytes it moves ("XLA's count"), which exceed the bytes counted when
it splits the update into several loops."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wdjax
from benchmarks.report import num, ratios, timing_table, yes
from benchmarks.timing import interleaved, log

TITLE = "3. Optimizer update bandwidth"
TARGET = 0.8
BYTES_PER_PARAM = 28
COLS = 1024
NATIVE_SRC = os.path.join(os.path.dirname(__file__), "streams.c")
NATIVE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")
NATIVE_KERNELS = ("memcpy", "same_streams", "adamw")


def _compiled(fn: Callable, *args: Any) -> tuple[Callable, float]:
    """``fn`` compiled for ``args``, and the bytes its program accesses by XLA's cost
    analysis."""
    c = fn.lower(*args).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return c, float(cost["bytes accessed"])


def make_params(n: int, kernels: int = 4, biases: int = 8) -> dict[str, Any]:
    """``kernels`` large (rows, 1024) leaves holding about ``n`` floats, plus ``biases``
    1024-wide bias leaves (not decayed)."""
    rows = max(1, n // kernels // COLS)
    params = {
        f"layer{i}": {"kernel": jnp.full((rows, COLS), 0.01, jnp.float32)} for i in range(kernels)
    }
    for i in range(biases):
        params[f"layer{i % kernels}"][f"bias{i // kernels}"] = jnp.zeros((COLS,), jnp.float32)
    return params


def _updater(opt: optax.GradientTransformation, params: Any, grads: Any):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    box = [jax.tree.map(jnp.copy, params)]
    box.append(opt.init(box[0]))
    update, xla_bytes = _compiled(update, box[0], box[1], grads)

    def run():
        box[0], box[1] = update(box[0], box[1], grads)
        return jax.block_until_ready(box[0])

    return run, xla_bytes


def _same_streams(params: Any, grads: Any):
    """AdamW's memory traffic with trivial arithmetic: read p, g, m, v and write p, m, v
    back in place (``x ← x + g``), 28 B a parameter: the ceiling of any fused update
    with that access pattern."""

    @functools.partial(jax.jit, donate_argnums=0)
    def touch(pmv, g):
        return tuple(jax.tree.map(jnp.add, x, g) for x in pmv)

    box = [tuple(jax.tree.map(jnp.copy, params) for _ in range(3))]
    touch, xla_bytes = _compiled(touch, box[0], grads)

    def run():
        box[0] = touch(box[0], grads)
        return jax.block_until_ready(box[0])

    return run, xla_bytes


def _copier(n_floats: int):
    """In-place copy (``dynamic_update_slice`` into a donated buffer: read 4n B, write 4n B)."""
    src = jnp.ones((n_floats // COLS, COLS), jnp.float32)
    box = [jnp.zeros_like(src)]
    copy = jax.jit(lambda s, d: jax.lax.dynamic_update_slice(d, s, (0, 0)), donate_argnums=1)
    copy, xla_bytes = _compiled(copy, src, box[0])

    def run():
        box[0] = copy(src, box[0])
        return jax.block_until_ready(box[0])

    return run, xla_bytes


def _numpy_copier(n_floats: int):
    src = np.ones(n_floats, np.float32)
    dst = np.zeros_like(src)
    return lambda: np.copyto(dst, src)


@contextlib.contextmanager
def native(n: int, n_copy: int) -> Iterator[tuple[dict[str, Callable[[], None]], str | None]]:
    """``({"native_<kernel>": run once}, None)`` from ``streams.c`` built with the system C
    compiler and run as a child process on this process's cores; ``({}, why)`` when it
    cannot be built or started, or JAX does not run on the CPU. A call's time includes a
    pipe round trip (tens of µs)."""
    if jax.default_backend() != "cpu":
        yield {}, f"JAX runs on {jax.default_backend()}, not on the CPU these loops run on"
        return
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        yield {}, "no C compiler (cc, gcc) on PATH"
        return
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "streams")
        built = subprocess.run(
            [cc, *NATIVE_FLAGS, "-o", exe, NATIVE_SRC, "-lm"], capture_output=True, text=True
        )
        if built.returncode:
            yield (
                {},
                f"{os.path.basename(cc)} {' '.join(NATIVE_FLAGS)} failed: "
                + (built.stderr.strip().splitlines() or ["no message"])[-1],
            )
            return
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        threads = str(len(cores) if cores else os.cpu_count())
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_PROC_BIND": "true"}
        proc = subprocess.Popen(
            [exe, str(n), str(n_copy)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        try:
            if not proc.stdout.readline().startswith("ready"):
                yield {}, f"streams exited with {proc.wait()} before it was ready"
                return

            def kernel(name: str) -> Callable[[], None]:
                def run() -> None:
                    proc.stdin.write(name + "\n")
                    proc.stdin.flush()
                    if proc.stdout.readline() != "ok\n":
                        raise RuntimeError(f"streams {name}: exited with {proc.wait()}")

                return run

            yield {f"native_{k}": kernel(k) for k in NATIVE_KERNELS}, None
        finally:
            proc.stdin.close()
            proc.wait()


def run(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "bytes_per_param": BYTES_PER_PARAM,
        "target": f"wdjax_adamw GB/s / copy GB/s >= {TARGET}",
        "native_flags": " ".join(NATIVE_FLAGS),
        "backend": jax.default_backend(),
        "sizes": {},
    }
    on_cpu = out["backend"] == "cpu"  # host memory is what the update moves
    for n_target in cfg.bandwidth_sizes:
        params = make_params(n_target)
        n = sum(x.size for x in jax.tree.leaves(params))
        grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
        mask = jax.tree.map(lambda x: x.ndim >= 2, params)
        n_copy = (BYTES_PER_PARAM * n // 8) // COLS * COLS
        xla = {
            "wdjax_adamw": _updater(wdjax.adamw(1e-3, 1e-4), params, grads),
            "optax_adamw": _updater(optax.adamw(1e-3, weight_decay=1e-4, mask=mask), params, grads),
            "same_streams": _same_streams(params, grads),
            "copy": _copier(n_copy),
        }
        del params
        bytes_moved = {
            **dict.fromkeys(("wdjax_adamw", "optax_adamw", "same_streams"), BYTES_PER_PARAM * n),
            **dict.fromkeys(("copy", "numpy_copyto", "native_memcpy"), 8 * n_copy),
            **dict.fromkeys(("native_same_streams", "native_adamw"), BYTES_PER_PARAM * n),
        }
        with native(n, n_copy) as (natives, skipped):
            contenders = {
                **{k: f for k, (f, _) in xla.items()},
                **({"numpy_copyto": _numpy_copier(n_copy)} if on_cpu else {}),
                **natives,
            }
            res = interleaved(
                contenders, rounds=cfg.bandwidth_rounds, number=cfg.bandwidth_number(n)
            )
        for k, r in res.items():
            r["bytes"] = bytes_moved[k]
            r["GB_per_s"] = bytes_moved[k] / r["median_s"] / 1e9
            r["GB_per_s_best"] = bytes_moved[k] / r["min_s"] / 1e9
            if k in xla:
                r["xla_bytes"] = xla[k][1]
                r["xla_GB_per_s"] = xla[k][1] / r["median_s"] / 1e9
        copy_bw = res["copy"]["GB_per_s"]
        gbs = {k: r["GB_per_s"] for k, r in res.items()}
        ratio_pairs = [
            ("wdjax_adamw", "copy"),
            ("optax_adamw", "copy"),
            ("wdjax_adamw", "optax_adamw"),
            ("same_streams", "copy"),
            ("wdjax_adamw", "same_streams"),
        ]
        if natives:
            ratio_pairs += [
                ("native_adamw", "native_memcpy"),
                ("native_same_streams", "native_memcpy"),
                ("native_memcpy", "copy"),
                ("wdjax_adamw", "native_adamw"),
            ]
        entry = {
            "params": n,
            "contenders": res,
            "ratios": {f"{a}/{b}": gbs[a] / gbs[b] for a, b in ratio_pairs},
            "xla_bytes_per_param": {k: r["xla_bytes"] / n for k, r in res.items() if k in xla},
            "native_skipped": skipped,
        }
        entry["met"] = gbs["wdjax_adamw"] / copy_bw >= TARGET
        out["sizes"][str(n_target)] = entry
        log(f"bandwidth {n:,} params, GB/s", res, lambda v: num(v["GB_per_s"], ".2f"))
        del contenders, xla, grads
        gc.collect()
    return out


def _native_note(e: dict[str, Any]) -> str:
    r = e["ratios"]
    if "native_adamw/native_memcpy" not in r:
        return f"fused C loops not run: {e['native_skipped']}"
    return f"AdamW as one C loop: {num(r['native_adamw/native_memcpy'])} × memcpy"


def summary(s: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"3. update bandwidth, {e['params']:,} params: wdjax AdamW / in-place copy",
            f"{num(e['ratios']['wdjax_adamw/copy'])} "
            f"({num(e['contenders']['wdjax_adamw']['GB_per_s'], '.1f')} vs "
            f"{num(e['contenders']['copy']['GB_per_s'], '.1f')} GB/s; XLA's program moves "
            f"{num(e['xla_bytes_per_param']['wdjax_adamw'], '.0f')} B a parameter, not "
            f"{BYTES_PER_PARAM}; {_native_note(e)})",
            f"≥ {TARGET}",
            yes(e["met"]),
        ]
        for e in s["sizes"].values()
    ]


EXTRA = {
    "MB counted": lambda r: num(r["bytes"] / 1e6, ".0f"),
    "MB by XLA's count": lambda r: num(r["xla_bytes"] / 1e6, ".0f") if "xla_bytes" in r else "–",
    "GB/s (median)": lambda r: num(r["GB_per_s"], ".2f"),
    "GB/s (best)": lambda r: num(r["GB_per_s_best"], ".2f"),
    "GB/s by XLA's count": lambda r: num(r["xla_GB_per_s"], ".2f") if "xla_bytes" in r else "–",
}


def render(s: dict[str, Any]) -> str:
    out = [
        f"## {TITLE}",
        s["what"],
        f"Target: {s['target']}. The fused C loops: `cc {s['native_flags']}`, one OpenMP "
        "thread per core of this process.",
    ]
    for e in s["sizes"].values():
        out += [
            f"### {e['params']:,} parameters",
            timing_table(e["contenders"], extra=EXTRA),
            f"Ratios: {ratios(e['ratios'])}.",
        ]
        if not e["met"]:
            r = e["ratios"]
            out.append(
                f"**Open:** {num(r['wdjax_adamw/copy'])} × an in-place copy (target ≥ {TARGET}; "
                f"optax.adamw: {num(r['optax_adamw/copy'])}). "
                + (
                    f"{_native_note(e)} in the same rounds "
                    f"({num(r['native_same_streams/native_memcpy'])} with one add per array), "
                    "so this machine allows the target. "
                    if "native_adamw/native_memcpy" in r
                    else f"({_native_note(e)}.) "
                )
                + _xla_cpu_note(s.get("backend", "cpu"), e)
            )
    return "\n\n".join(out)


def _xla_cpu_note(backend: str, e: dict[str, Any]) -> str:
    """Why XLA:CPU's update moves more than it needs; nothing on another backend."""
    if backend != "cpu":
        return ""
    c, xb = e["contenders"], e["xla_bytes_per_param"]
    return (
        "XLA:CPU does not fuse the update "
        f"into one loop: by its own cost analysis the program moves "
        f"{num(xb['wdjax_adamw'], '.0f')} B a parameter, not {BYTES_PER_PARAM} (a loop "
        "each for μ, ν and the params, which re-read the gradient and the new moments: "
        f"HISTORY.md), so it moves {num(c['wdjax_adamw']['xla_GB_per_s'], '.1f')} GB/s, "
        f"{num(c['wdjax_adamw']['xla_GB_per_s'] / c['copy']['GB_per_s'])} × the copy's "
        f"rate; `same_streams` moves {num(xb['same_streams'], '.0f')} B a parameter the "
        "same way. XLA:CPU's multi-output fusion, which merges loops that share inputs, "
        "is experimental and off by default "
        "(`--xla_backend_extra_options=xla_cpu_use_multi_output_fusion`; it can crash "
        "the compiler: openxla/xla#47367, fix in review in openxla/xla#48091)."
    )
