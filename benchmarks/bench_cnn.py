"""Where XLA:CPU loses on the CNN: its pieces timed alone in JAX and PyTorch, conv layouts
and formulations, pooling formulations, matmul precision, and XLA_FLAGS (each flag set in
a child process, since XLA reads them once).

    python -m benchmarks.bench_cnn --child   # one child: prints a JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, proposals
from benchmarks.timing import interleaved

FLAG_SETS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_multi_thread_eigen=false",
]


def _jax(fn, *args):
    f = jax.jit(fn)
    args = jax.device_put(args)
    return lambda: jax.block_until_ready(f(*args))


def _conv(x, w, layout="NHWC"):
    return proposals._conv(x, w, 0.0, layout)


def _im2col_conv(x, w):
    """Conv as one matmul over explicit patches (pad + 9 shifted slices)."""
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], -1)
    return cols @ w.reshape(-1, w.shape[-1])


def _patches_conv(x, w):
    """Conv as ``conv_general_dilated_patches`` + matmul."""
    p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kh, kw, ci, co = w.shape
    return p @ w.transpose(2, 0, 1, 3).reshape(ci * kh * kw, co)


def _grad(f, argnums):
    return jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=argnums)


def components(cfg: Any) -> dict[str, Any]:
    """Each piece of the CNN step alone: JAX variants and PyTorch, interleaved per piece."""
    B = cfg.batch_size
    rng = np.random.default_rng(0)
    x1 = rng.random((B, 28, 28, 1), dtype=np.float32)
    w1 = (rng.standard_normal((3, 3, 1, 32)) * 0.3).astype(np.float32)
    x2 = rng.random((B, 14, 14, 32), dtype=np.float32)
    w2 = (rng.standard_normal((3, 3, 32, 64)) * 0.06).astype(np.float32)
    a1 = rng.random((B, 28, 28, 32), dtype=np.float32)
    nchw = lambda f: (lambda x, w: f(x, w, "NCHW"))  # noqa: E731
    pieces: dict[str, dict[str, Any]] = {
        "conv1 forward (1->32, 28x28)": {
            "jax_nhwc": _jax(_conv, x1, w1), "jax_nchw": _jax(nchw(_conv), x1, w1),
        },
        "conv1 backward dW": {
            "jax_nhwc": _jax(_grad(_conv, 1), x1, w1), "jax_nchw": _jax(_grad(nchw(_conv), 1), x1, w1),
        },
        "conv2 forward (32->64, 14x14)": {
            "jax_nhwc": _jax(_conv, x2, w2), "jax_nchw": _jax(nchw(_conv), x2, w2),
            "jax_im2col_matmul": _jax(_im2col_conv, x2, w2), "jax_patches_matmul": _jax(_patches_conv, x2, w2),
        },
        "conv2 backward dx+dW": {
            "jax_nhwc": _jax(_grad(_conv, (0, 1)), x2, w2), "jax_nchw": _jax(_grad(nchw(_conv), (0, 1)), x2, w2),
            "jax_im2col_matmul": _jax(_grad(_im2col_conv, (0, 1)), x2, w2),
        },
        "maxpool 2x2 forward+backward (28x28x32)": {
            "jax_reduce_window": _jax(jax.grad(lambda a: jnp.sum(proposals.max_pool_2x2_reduce_window(a) ** 2)), a1),
            "jax_strided_max": _jax(jax.grad(lambda a: jnp.sum(proposals.max_pool_2x2_strided(a) ** 2)), a1),
        },
    }
    if common.torch_available():
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(common.TORCH_THREADS)
        t = lambda a, grad=False: torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(grad)  # noqa: E731
        tx1, tw1 = t(x1.transpose(0, 3, 1, 2)), t(w1.transpose(3, 2, 0, 1), True)
        tx2, tw2 = t(x2.transpose(0, 3, 1, 2), True), t(w2.transpose(3, 2, 0, 1), True)
        ta1 = t(a1.transpose(0, 3, 1, 2), True)

        def fwd(x, w):
            def f():
                with torch.no_grad():
                    return F.conv2d(x, w, padding=1)
            return f

        def bwd(x, w):
            def f():
                (F.conv2d(x, w, padding=1) ** 2).sum().backward()
            return f

        def pool():
            (F.max_pool2d(ta1, 2) ** 2).sum().backward()

        pieces["conv1 forward (1->32, 28x28)"]["torch"] = fwd(tx1, tw1)
        pieces["conv1 backward dW"]["torch"] = bwd(tx1, tw1)
        pieces["conv2 forward (32->64, 14x14)"]["torch"] = fwd(tx2, tw2)
        pieces["conv2 backward dx+dW"]["torch"] = bwd(tx2, tw2)
        pieces["maxpool 2x2 forward+backward (28x28x32)"]["torch"] = pool
    if cfg.quick:
        pieces = {k: v for k, v in pieces.items() if k.startswith("maxpool")}
    out = {}
    for piece, contenders in pieces.items():
        res = interleaved(contenders, rounds=cfg.cnn_rounds, number=cfg.cnn_number)
        out[piece] = res
        print(f"  cnn {piece}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in res.items()), flush=True)
    return out


def steps(cfg: Any) -> dict[str, Any]:
    """The whole library train step on the CNN, formulations compared."""
    base = common.create_model("cnn")
    data = common.batch(cfg.batch_size)
    opt = common.wdjax_optimizer
    contenders = {
        "library_cnn": common.wdjax_step(base, opt(), data),
        "strided_pool": common.wdjax_step(proposals.FastPoolCNN(base), opt(), data),
        "strided_pool_nchw": common.wdjax_step(proposals.FastPoolCNN(base, layout="NCHW"), opt(), data),
        "canonical_conv": common.wdjax_step(proposals.FastPoolCNN(base, pool="reduce_window", layout="canonical"), opt(), data),
        "strided_pool_canonical_conv": common.wdjax_step(proposals.FastPoolCNN(base, layout="canonical"), opt(), data),
        "reduce_window_pool_functional": common.wdjax_step(proposals.FastPoolCNN(base, pool="reduce_window"), opt(), data),
    }
    if cfg.quick:
        contenders = {k: contenders[k] for k in ("library_cnn", "strided_pool_canonical_conv")}
    bf16_step = common.wdjax_step(proposals.FastPoolCNN(base), opt(), data)

    def bf16():  # the precision is part of jit's cache key: call under the context every time
        with jax.default_matmul_precision("bfloat16"):
            return bf16_step()

    if not cfg.quick:
        contenders["strided_pool_precision_bf16"] = bf16
    res = interleaved(contenders, rounds=cfg.cnn_step_rounds, number=1)
    base_s = res["library_cnn"]["median_s"]
    for r in res.values():
        r["speedup_vs_library"] = base_s / r["median_s"]
    print("  cnn steps: " + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in res.items()), flush=True)
    return res


def scan_convs(cfg: Any) -> dict[str, Any]:
    """Convolutions XLA:CPU left in a non-canonical form (not ``b01f_01io->b01f``: no
    fast Eigen kernel) in the compiled step and in the compiled ``run_steps`` scan."""
    import re

    from wdjax import train

    out = {}
    B, L = cfg.batch_size, 2
    data = common.batch(B, n=B * L)
    base = common.create_model("cnn")
    for label, model in (("library_cnn", base), ("canonical_conv", proposals.FastPoolCNN(base, layout="canonical"))):
        opt = common.wdjax_optimizer()
        step = train.make_train_step(model, opt)
        state = train.init_state(model, opt, jax.random.PRNGKey(0))
        texts = {
            "step": jax.jit(step).lower(state, {"x": data["x"][:B], "y": data["y"][:B]}).compile().as_text(),
            "scan": jax.jit(train.run_steps, static_argnums=(0, 4, 5)).lower(step, state, data["x"], data["y"], B, L).compile().as_text(),
        }
        for where, text in texts.items():
            labels = re.findall(r" convolution\(.*?dim_labels=([\w>-]+)", text)
            out[f"{label}/{where}"] = {
                "convolutions": len(labels),
                "non_canonical": sum(lab != "b01f_01io->b01f" for lab in labels),
            }
    print(f"  cnn non-canonical convs: {out}", flush=True)
    return out


def child(rounds: int, batch_size: int) -> dict[str, Any]:
    base = common.create_model("cnn")
    data = common.batch(batch_size)
    res = interleaved(
        {
            "library_cnn": common.wdjax_step(base, common.wdjax_optimizer(), data),
            "strided_pool": common.wdjax_step(proposals.FastPoolCNN(base), common.wdjax_optimizer(), data),
        },
        rounds=rounds,
    )
    return {k: v["median_s"] for k, v in res.items()} | {f"{k}_min": v["min_s"] for k, v in res.items()}


def flags(cfg: Any) -> dict[str, Any]:
    out = {}
    for flag in FLAG_SETS:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_cnn", "--child", str(cfg.cnn_step_rounds), str(cfg.batch_size)],
            env=env, capture_output=True, text=True, timeout=300,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
        out[flag or "(none)"] = json.loads(line) if line else {"error": proc.stderr[-500:]}
        print(f"  cnn XLA_FLAGS={flag or '(none)'}: {out[flag or '(none)']}", flush=True)
    return out


def run(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": f"pieces of the CNN step timed alone (batch {cfg.batch_size}), JAX variants vs PyTorch; "
        "whole library step with other formulations; XLA_FLAGS in child processes",
        "components": components(cfg),
        "steps": steps(cfg),
    }
    if not cfg.quick:
        out["scan_convs"] = scan_convs(cfg)
        out["fast_pool_max_abs_diff"] = proposals.check_fast_pool(common.create_model("cnn"), common.batch(16))
    if cfg.cnn_flags:
        out["xla_flags"] = flags(cfg)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))

