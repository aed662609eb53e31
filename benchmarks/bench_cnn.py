"""Where the CNN's time goes on XLA:CPU: its pieces timed alone in JAX and PyTorch, and the
backward passes inside ``lax.scan`` (how ``fit`` trains), with JAX's autodiff of the plain
``lax`` ops (what ``wdjax.lab.ops`` replaces) as the contrast, all compiled with the lab's
options (``wdjax.lab.compiler``: convolutions off YNNPACK), and the convolutions also with
jaxlib's default options (``*_ynn``). The earlier investigation (conv layouts, im2col,
matmul precision, XLA_FLAGS) is in HISTORY.md."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.report import code, get, ms, num, table, timing_cells, timing_head
from benchmarks.timing import interleaved, log
from wdjax.lab import compiler, ops, train

TITLE = "6. The CNN on XLA:CPU: where its time goes"
POOL = "maxpool 2x2 forward+backward (28x28x32)"
CONV2 = "conv2 backward dx+dW"

SAME = ((1, 1), (1, 1))
CANONICAL = "b01f_01io->b01f"  # the only conv form XLA:CPU runs with its fast Eigen kernel


def lax_conv(x, w):
    """The plain ``lax`` conv; differentiated by JAX's autodiff (transposed convs)."""
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def ops_conv(x, w):
    return ops.conv2d(x, w, SAME)


def reduce_window_pool(x):
    """What ``nnx.max_pool(x, (2, 2), strides=(2, 2))`` lowers to; its gradient is a scatter."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _loss_grad(f, argnums):
    return jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=argnums)


def _jax(fn, *args, ynn: bool = False):
    """``fn`` on ``args``, jitted with the lab's options (``ynn``: with jaxlib's own)."""
    f = jax.jit(fn) if ynn else common.jit(fn)
    args = jax.device_put(args)
    return lambda: jax.block_until_ready(f(*args))


def _scanned(conv, length: int, wrt_x: bool):
    """``length`` conv backward passes in one ``lax.scan``, each step's input depending
    on the last (so nothing is hoisted out of the loop)."""
    grad = _loss_grad(conv, (0, 1))

    def f(x, w):
        def body(carry, _):
            x, w = carry
            gx, gw = grad(x, w)
            return (x - 1e-6 * gx if wrt_x else x, w - 1e-6 * gw), None

        return jax.lax.scan(body, (x, w), None, length=length)[0]

    return f


def _arrays(batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x1": rng.random((batch_size, 28, 28, 1), dtype=np.float32),
        "w1": (rng.standard_normal((3, 3, 1, 32)) * 0.3).astype(np.float32),
        "x2": rng.random((batch_size, 14, 14, 32), dtype=np.float32),
        "w2": (rng.standard_normal((3, 3, 32, 64)) * 0.06).astype(np.float32),
        "a1": rng.random((batch_size, 28, 28, 32), dtype=np.float32),
    }


def components(cfg: Any) -> dict[str, Any]:
    """Each piece of the CNN step alone in one ``jit``: JAX and PyTorch, interleaved."""
    a = _arrays(cfg.batch_size)
    x1, w1, x2, w2, a1 = a["x1"], a["w1"], a["x2"], a["w2"], a["a1"]
    pieces: dict[str, dict[str, Any]] = {
        "conv1 backward dW (1->32, 28x28)": {
            "lax_autodiff": _jax(_loss_grad(lax_conv, 1), x1, w1),
            "wdjax_ops": _jax(_loss_grad(ops_conv, 1), x1, w1),
            "wdjax_ops_ynn": _jax(_loss_grad(ops_conv, 1), x1, w1, ynn=True),
        },
        "conv2 forward (32->64, 14x14)": {
            "jax": _jax(lax_conv, x2, w2),
            "jax_ynn": _jax(lax_conv, x2, w2, ynn=True),
        },
        CONV2: {
            "lax_autodiff": _jax(_loss_grad(lax_conv, (0, 1)), x2, w2),
            "wdjax_ops": _jax(_loss_grad(ops_conv, (0, 1)), x2, w2),
            "wdjax_ops_ynn": _jax(_loss_grad(ops_conv, (0, 1)), x2, w2, ynn=True),
        },
        POOL: {
            "reduce_window": _jax(jax.grad(lambda v: jnp.sum(reduce_window_pool(v) ** 2)), a1),
            "wdjax_ops": _jax(jax.grad(lambda v: jnp.sum(ops.max_pool_2x2(v) ** 2)), a1),
        },
    }
    if common.torch_available():
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(common.TORCH_THREADS)
        t = lambda v, grad=False: torch.from_numpy(np.ascontiguousarray(v)).requires_grad_(grad)  # noqa: E731
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

        pieces["conv1 backward dW (1->32, 28x28)"]["torch"] = bwd(tx1, tw1)
        pieces["conv2 forward (32->64, 14x14)"]["torch"] = fwd(tx2, tw2)
        pieces[CONV2]["torch"] = bwd(tx2, tw2)
        pieces[POOL]["torch"] = pool
    if cfg.quick:
        pieces = {POOL: pieces[POOL]}
    out = {}
    for piece, contenders in pieces.items():
        res = interleaved(contenders, rounds=cfg.cnn_rounds, number=cfg.cnn_number)
        out[piece] = res
        log(f"cnn {piece}, ms", res, lambda v: ms(v["median_s"]))
    return out


def _per_iteration(summary: dict[str, Any], length: int) -> dict[str, Any]:
    return {k: v / length if k.endswith("_s") else v for k, v in summary.items()}


def in_scan(cfg: Any) -> dict[str, Any]:
    """The conv backward passes inside ``lax.scan``: ms per iteration, autodiff vs ops."""
    a = _arrays(cfg.batch_size)
    length = cfg.cnn_scan_length
    pieces = {
        "conv1 backward dW, in lax.scan": (a["x1"], a["w1"], False),
        "conv2 backward dx+dW, in lax.scan": (a["x2"], a["w2"], True),
    }
    if cfg.quick:
        pieces = {k: v for k, v in pieces.items() if k.startswith("conv2")}
    out = {}
    for piece, (x, w, wrt_x) in pieces.items():
        contenders = {
            "lax_autodiff": _jax(_scanned(lax_conv, length, wrt_x), x, w),
            "wdjax_ops": _jax(_scanned(ops_conv, length, wrt_x), x, w),
            "wdjax_ops_ynn": _jax(_scanned(ops_conv, length, wrt_x), x, w, ynn=True),
        }
        res = interleaved(contenders, rounds=cfg.cnn_rounds, warmup=1)
        out[piece] = {
            k: {**_per_iteration(v, length), "scan_length": length} for k, v in res.items()
        }
        log(f"cnn {piece}, ms per iteration", out[piece], lambda v: ms(v["median_s"]))
    return out


def _conv_forms(text: str) -> dict[str, int]:
    labels = re.findall(r" convolution\(.*?dim_labels=([\w>-]+)", text)
    return {"convolutions": len(labels), "non_canonical": sum(lab != CANONICAL for lab in labels)}


def scan_convs(cfg: Any) -> dict[str, Any]:
    """Convolutions XLA:CPU leaves in a non-canonical form (no fast kernel) in the compiled
    library CNN step and ``run_steps`` scan, and in a scanned autodiff conv (the contrast)."""
    B, L = cfg.batch_size, 2
    data = common.batch(B, n=B * L)
    model = common.create_model("cnn")
    opt = common.wdjax_optimizer()
    step = train.make_train_step(model, opt)
    state = train.init_state(model, opt, jax.random.PRNGKey(0))
    a = _arrays(B)
    texts = {
        "wdjax CNN train step (jit)": common.jit(step).lower(
            state, {"x": data["x"][:B], "y": data["y"][:B]}
        ),
        "wdjax CNN run_steps (lax.scan)": common.jit(
            train.run_steps, static_argnums=(0, 3, 4)
        ).lower(step, state, data, B, L),
        "lax autodiff conv2 backward (jit)": jax.jit(_loss_grad(lax_conv, (0, 1))).lower(
            a["x2"], a["w2"]
        ),
        "lax autodiff conv2 backward (lax.scan)": jax.jit(_scanned(lax_conv, L, True)).lower(
            a["x2"], a["w2"]
        ),
        "wdjax.ops conv2 backward (lax.scan)": jax.jit(_scanned(ops_conv, L, True)).lower(
            a["x2"], a["w2"]
        ),
    }
    out = {k: _conv_forms(v.compile().as_text()) for k, v in texts.items()}
    log(
        "cnn non-canonical convolutions", out, lambda v: f"{v['non_canonical']}/{v['convolutions']}"
    )
    return out


def check_ops(cfg: Any) -> dict[str, float]:
    """Max |difference| between ``wdjax.lab.ops`` and the plain ``lax`` ops: values and
    gradients."""
    a = _arrays(16)
    x, w, p = a["x2"], a["w2"], a["a1"]
    gl = jax.jit(_loss_grad(lax_conv, (0, 1)))(x, w)
    go = jax.jit(_loss_grad(ops_conv, (0, 1)))(x, w)
    pool_grad = lambda f: jax.jit(jax.grad(lambda v: jnp.sum(f(jax.nn.relu(v - 0.5)) ** 2)))(p)  # noqa: E731
    return {
        "conv_value": float(jnp.max(jnp.abs(lax_conv(x, w) - ops_conv(x, w)))),
        "conv_grads": max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(gl, go)),
        "pool_value": float(jnp.max(jnp.abs(reduce_window_pool(p) - ops.max_pool_2x2(p)))),
        "pool_grad_after_relu": float(
            jnp.max(jnp.abs(pool_grad(reduce_window_pool) - pool_grad(ops.max_pool_2x2)))
        ),
    }


def run(cfg: Any) -> dict[str, Any]:
    if jax.default_backend() != "cpu":
        return {"skipped": f"this section is about XLA:CPU; JAX runs on {jax.default_backend()}"}
    out: dict[str, Any] = {
        "what": f"pieces of the CNN step (batch {cfg.batch_size}) each in one jit, JAX vs "
        "PyTorch; the conv backward passes inside lax.scan "
        f"({cfg.cnn_scan_length} iterations, ms per iteration). lax_autodiff / reduce_window: "
        "JAX's autodiff of the plain lax ops (what nnx.Conv and nnx.max_pool do by default); "
        "wdjax_ops: wdjax.lab.ops.conv2d / max_pool_2x2, which the wdjax CNN uses. Every JAX "
        "contender is compiled with the lab's options (wdjax.lab.compiler.options(): "
        f"{compiler.options() or 'none on this backend and jaxlib'}), as fit compiles; *_ynn: "
        "the same with jaxlib's default options, which hand convolutions to YNNPACK",
        "components": components(cfg),
        "in_scan": in_scan(cfg),
    }
    if not cfg.quick:
        out["scan_convs"] = scan_convs(cfg)
        out["ops_max_abs_diff"] = check_ops(cfg)
    return out


def summary(s: dict[str, Any]) -> list[list[str]]:
    return []  # no target: this section explains section 2's CNN numbers


def _pieces_table(res: dict[str, dict[str, Any]], base: str, fmt: str) -> str:
    """One row per (piece, implementation): timings and the median over ``base``'s."""
    rows = []
    for piece, contenders in res.items():
        b = get(contenders, base, "median_s")
        rows += [
            [piece, code(k), *timing_cells(r), num(r["median_s"] / b, fmt) if b else "–"]
            for k, r in contenders.items()
        ]
    return table(["piece", "implementation", *timing_head(), f"× {base}"], rows)


def _findings(s: dict[str, Any]) -> list[str]:
    def med(piece: dict[str, Any], k: str) -> Any:
        return get(piece, k, "median_s")

    out = []
    s2 = get(s, "in_scan", "conv2 backward dx+dW, in lax.scan")
    if s2:
        slow, fast = med(s2, "lax_autodiff"), med(s2, "wdjax_ops")
        out.append(
            "* **Inside `lax.scan` (how `fit` trains) JAX's autodiff conv backward is "
            f"{num(slow / fast, '.1f')}× slower than `wdjax.lab.ops.conv2d`'s** ({ms(slow)} vs "
            f"{ms(fast)} ms per iteration for conv2's dx+dW): autodiff emits transposed "
            "convolutions that XLA:CPU rewrites into its fast canonical form in a plain `jit` "
            "but not inside a `while` loop (jax-ml/jax#12868), where they run as naive loops. "
            "`wdjax.lab.ops.conv2d` writes the backward pass as two canonical forward "
            "convolutions, so every convolution of the library CNN stays canonical, in and out "
            "of the scan."
        )
    pool = get(s, "components", POOL)
    if pool:
        out.append(
            "* **Max-pool**: `reduce_window`'s gradient (`select_and_scatter`, scalar loops on "
            f"XLA:CPU) takes {ms(med(pool, 'reduce_window'))} ms for one 28×28×32 pool "
            "forward+backward; `wdjax.lab.ops.max_pool_2x2` (the max of four strided slices, "
            "its backward pass one elementwise pass) "
            f"{ms(med(pool, 'wdjax_ops'))} ms; PyTorch {ms(med(pool, 'torch'))} ms."
        )
    ynn = []
    for piece, r in {**(s.get("components") or {}), **(s.get("in_scan") or {})}.items():
        lab, default = (
            (med(r, "wdjax_ops"), med(r, "wdjax_ops_ynn"))
            if "wdjax_ops_ynn" in r
            else (med(r, "jax"), med(r, "jax_ynn"))
        )
        if lab and default:
            ynn.append(f"{piece} {ms(default)} vs {ms(lab)} ms ({num(default / lab, '.2f')}×)")
    if ynn:
        out.append(
            "* **YNNPACK's convolutions** (jaxlib's default options vs the lab's, which keep "
            "convolutions on XLA's own kernel): " + "; ".join(ynn) + ". `wdjax.lab.compiler` "
            "compiles `fit`'s, `sweep`'s and `evaluate`'s programs with the lab's options."
        )
    parts, slower = [], []
    for piece, r in (s.get("components") or {}).items():
        j, t = med(r, "wdjax_ops") or med(r, "jax"), med(r, "torch")
        if j and t:
            parts.append(f"{piece} {ms(j)} vs {ms(t)} ms ({num(j / t, '.2f')}×)")
            slower += [piece] if j > t else []
    if parts:
        out.append(
            "* **Piece by piece, wdjax vs PyTorch** (the lab's `jit` vs oneDNN): "
            + "; ".join(parts)
            + (
                f". Slower than PyTorch here: {', '.join(slower)}."
                if slower
                else ". No piece is slower than PyTorch's here."
            )
        )
    return out


def render(s: dict[str, Any]) -> str:
    if "skipped" in s:
        return f"## {TITLE}\n\nNot run: {s['skipped']}."
    out = [f"## {TITLE}", s["what"]]
    if s.get("components"):
        out += ["### Pieces alone (one `jit` each)", _pieces_table(s["components"], "torch", ".2f")]
    if s.get("in_scan"):
        out += [
            "### Backward passes inside `lax.scan` (ms per iteration)",
            _pieces_table(s["in_scan"], "wdjax_ops", ".1f"),
        ]
    if s.get("scan_convs"):
        rows = [
            [k, str(v["convolutions"]), str(v["non_canonical"])] for k, v in s["scan_convs"].items()
        ]
        out += [
            "### Convolutions XLA:CPU leaves in a slow (non-canonical) form",
            table(["compiled function", "convolutions", f"not `{CANONICAL}`"], rows),
        ]
    if s.get("ops_max_abs_diff"):
        out.append(
            "Max |difference| between `wdjax.lab.ops` and the plain `lax` ops (values, gradients; "
            f"the pool's gradient after a ReLU): {s['ops_max_abs_diff']}."
        )
    findings = _findings(s)
    if findings:
        out += ["### Findings", "\n".join(findings)]
    return "\n\n".join(out)
