"""Shared pieces of the benchmarks: the environment record, the reference models and
batches, the library's step and the hand-written Optax and PyTorch contenders."""

from __future__ import annotations

import datetime
import glob
import json
import os
import pathlib
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wdjax
from wdjax.lab import compiler, models, train

INPUT_SHAPE = (28, 28, 1)
MLP_WIDTHS = (512, 512)
LR, WD, L1 = 1e-3, 1e-4, 1e-5
TORCH_THREADS = 2  # what XLA's CPU client uses here: one thread per core


# ---------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512", "amx", "neon", "asimd", "sve")


def cpu_flags() -> str:
    """The vector instruction sets of /proc/cpuinfo's ``flags`` (or ``Features``): what
    XLA's, oneDNN's and the C compiler's kernels can use here ("" where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return ""
    return " ".join(w for w in line.split(":", 1)[1].split() if w.startswith(VECTOR_FLAGS))


def cpu_caches() -> str:
    """``L1d 48K, L2 2048K, L3 266240K (shared by 0-1)``: cpu0's data caches from sysfs
    ("" where unknown). The update-bandwidth sizes are read against the last level."""
    parts = []
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            kind, level, size, shared = (
                pathlib.Path(d, k).read_text().strip()
                for k in ("type", "level", "size", "shared_cpu_list")
            )
        except OSError:
            continue
        if kind != "Instruction":
            parts.append(f"L{level}{'d' if kind == 'Data' else ''} {size} (shared by {shared})")
    return ", ".join(parts)


def device_slug() -> str:
    """``cpu-amd-epyc-2c`` or ``gpu-...``: the results file's prefix."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        name = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    else:
        name = f"{d.platform}-{d.device_kind}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict[str, str]:
    import flax
    import jaxlib

    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "wdjax": wdjax.__version__,
    }
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "not installed"
    return out


def environment() -> dict[str, Any]:
    d = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"{d.platform}: {d.device_kind}",
        "device_slug": device_slug(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cpu_caches": cpu_caches(),
        "jax_devices": len(jax.devices()),
        "torch_threads": TORCH_THREADS,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(),
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------- models, data


def create_model(name: str) -> models.Model:
    if name == "mlp":
        return models.create("mlp", input_shape=INPUT_SHAPE, widths=MLP_WIDTHS)
    return models.create("cnn", input_shape=INPUT_SHAPE)


def batch(batch_size: int, seed: int = 0, n: int | None = None) -> dict[str, np.ndarray]:
    """Random images in [0, 1) (NHWC) and labels: ``n`` examples (default one batch)."""
    rng = np.random.default_rng(seed)
    n = n or batch_size
    return {
        "x": rng.random((n, *INPUT_SHAPE), dtype=np.float32),
        "y": rng.integers(0, 10, n).astype(np.int32),
    }


def kernel_mask(params: Any) -> Any:
    """Decay kernels, not biases: what ``wdjax.masks.default()`` selects here."""
    return jax.tree.map(lambda w: w.ndim >= 2, params)


def wdjax_optimizer(l1: bool = False) -> optax.GradientTransformation:
    """Masked decoupled decay (the maths of ``optax.adamw(mask=kernels)``), all
    hyperparameters traced; ``l1=True`` adds the L1 proximal step (which Optax lacks)."""
    return wdjax.adamw(LR, WD, l1=L1 if l1 else None)


# ---------------------------------------------------------------- roofline


PEAK_N = 2048  # the roofline's reference: an n×n f32 matmul
PEAK_FLOP = 2 * PEAK_N**3


def matmul_call(n: int = PEAK_N) -> Callable[[], Any]:
    """One jitted n×n f32 matmul that waits for its result: a contender whose rate, timed
    in the same rounds as the others, is the machine's compute ceiling for them (a peak
    measured once, apart, moved by 2× between runs on this shared VM)."""
    a = jax.device_put(np.random.default_rng(0).random((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    return lambda: f(a).block_until_ready()


def step_flops(model: Any, opt: optax.GradientTransformation, data: dict) -> float:
    """FLOPs of one library train step on ``data``, as XLA counts them."""
    step = train.make_train_step(model, opt, weight_metrics_each_step=False, guard=False)
    step = jit(step)
    state = train.init_state(model, opt, jax.random.PRNGKey(0))
    cost = step.lower(state, jax.device_put(data)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


# ---------------------------------------------------------------- JAX contenders


def jit(fn: Callable, **kw: Any) -> Any:
    """``jax.jit`` with the lab's compile options (``wdjax.lab.compiler.options()``), as
    ``fit`` and ``sweep`` compile: every JAX contender, hand-written or not, gets them."""
    return jax.jit(fn, compiler_options=compiler.options(), **kw)


def wdjax_step(
    model: Any,
    opt: optax.GradientTransformation,
    data: dict,
    weight_metrics: bool = False,
    guard: bool = False,
) -> Callable[[], Any]:
    """The library's train step as ``fit`` runs it (its metrics, unguarded: ``fit``
    replays a faulty stretch with the guard; per-step weight norms only with
    ``weight_metrics``; ``guard=True``, the step of ``fit(guard="step")`` and of a
    replay), jitted, state donated."""
    step = train.make_train_step(model, opt, weight_metrics_each_step=weight_metrics, guard=guard)
    step = jit(step, donate_argnums=0)
    b = jax.device_put(data)
    box = [train.init_state(model, opt, jax.random.PRNGKey(0))]

    def run():
        box[0], metrics = step(box[0], b)
        return jax.block_until_ready((box[0], metrics))

    return run


def hand_step(model: Any, model_state: Any, opt: optax.GradientTransformation, cond: bool = False):
    """A hand-written ``step(params, opt_state, x, y) -> (params, opt_state, loss)``: loss,
    grad, ``opt.update``, ``apply_updates``; no metrics. Not jitted. ``cond=True`` puts
    the update under a ``lax.cond`` on the finite loss alone: the structure of the
    library's guard against non-finite steps, without its checks."""

    def loss_fn(p, x, y):
        logits, _ = model.apply(p, model_state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)

        def update():
            u, new_s = opt.update(g, s, p)
            return optax.apply_updates(p, u), new_s

        if not cond:
            return (*update(), loss)
        return (*jax.lax.cond(jnp.isfinite(loss), update, lambda: (p, s)), loss)

    return step


def minimal_step(
    model: Any, opt: optax.GradientTransformation, data: dict, cond: bool = False
) -> Callable[[], Any]:
    """:func:`hand_step` jitted, params and optimizer state donated, on one batch."""
    params, model_state = model.init(jax.random.PRNGKey(0))
    step = jit(hand_step(model, model_state, opt, cond), donate_argnums=(0, 1))
    x, y = jax.device_put(data["x"]), jax.device_put(data["y"])
    box = [params, opt.init(params)]

    def run():
        box[0], box[1], loss = step(box[0], box[1], x, y)
        return jax.block_until_ready((box[0], loss))

    return run


def optax_adamw(model: Any) -> optax.GradientTransformation:
    params, _ = model.init(jax.random.PRNGKey(0))
    return optax.adamw(LR, weight_decay=WD, mask=kernel_mask(params))


def scanned_steps(
    model: Any,
    opt: optax.GradientTransformation,
    batch_size: int,
    length: int,
) -> Callable[[], Any]:
    """``length`` library steps as one ``lax.scan`` over device-resident data, as ``fit``
    runs them (``train.run_steps``, state donated, unguarded from a copy of the start
    state that a faulty stretch would be replayed from: ``train.replay_faulty``): one
    call is one epoch of ``batch_size * length`` random examples."""
    steps = {
        g: train.make_train_step(model, opt, weight_metrics_each_step=False, guard=g)
        for g in (False, True)
    }
    run_steps = jit(train.run_steps, static_argnums=(0, 3, 4), donate_argnums=1)
    data = jax.device_put(batch(batch_size, n=batch_size * length))
    box = [train.init_state(model, opt, jax.random.PRNGKey(0))]

    def stretch(state: Any, guarded: bool) -> Any:
        return run_steps(steps[guarded], state, data, batch_size, length)

    def run():
        box[0], metrics = train.replay_faulty(stretch, box[0])
        return jax.block_until_ready((box[0], metrics))

    return run


# ---------------------------------------------------------------- PyTorch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> tuple[str | None, str]:
    """``(device, "")`` where the PyTorch peer runs beside JAX's default backend: ``"cpu"``
    beside XLA:CPU, ``"cuda"`` beside a JAX GPU; ``(None, why)`` where it has no fair
    place (no PyTorch; a CPU-only PyTorch beside a GPU; TPU, where PyTorch would need
    torch_xla)."""
    if not torch_available():
        return None, "PyTorch is not installed"
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu", ""
    import torch

    if backend == "gpu" and torch.cuda.is_available():
        return "cuda", ""
    if backend == "gpu":
        return None, "this PyTorch has no CUDA: a CPU PyTorch is no peer for a GPU"
    return None, f"no PyTorch peer on {backend} (PyTorch there would need torch_xla)"


def torch_on(device: str) -> Any:
    """``torch``, set for ``device``: on CUDA, TF32 matmuls, as JAX's default precision
    uses on a GPU (PyTorch's own default there is full f32)."""
    import torch

    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    return torch


def torch_matmul(device: str, n: int = PEAK_N) -> Callable[[], Any]:
    """PyTorch's n×n f32 matmul on ``device``, waiting for it: the peak's other probe."""
    torch = torch_on(device)
    a = torch.from_numpy(np.random.default_rng(0).random((n, n), np.float32)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    return lambda: (a @ a, sync())


def torch_model(name: str):
    import torch.nn as nn

    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def torch_epoch(
    name: str, data: dict, batch_size: int, compiled: bool, device: str = "cpu"
) -> Callable[[int], Any]:
    """PyTorch AdamW (no decay on biases) on the same architecture and data (NCHW) on
    ``device``: ``run(k)`` takes ``k`` steps, each on a fresh batch drawn by a random
    permutation of the examples (the indexing is part of the step, as in ``fit``), and
    waits for them (it reads the last loss). On CUDA at PyTorch's best: the fused AdamW,
    and TF32 matmuls as JAX's default precision uses on a GPU."""
    import torch.nn.functional as F

    torch = torch_on(device)
    torch.manual_seed(0)
    model = torch_model(name).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}],
        lr=LR,
        fused=True if device == "cuda" else None,
    )
    x = torch.from_numpy(np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2))).to(device)
    y = torch.from_numpy(data["y"].astype(np.int64)).to(device)
    n = len(y)

    def step(idx):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(step) if compiled else step

    def run(k: int) -> float:
        order = torch.randperm(n, device=device)
        loss = None
        for i in range(k):
            j = i % (n // batch_size)
            loss = fn(order[j * batch_size : (j + 1) * batch_size])
        return float(loss.detach())

    return run


class TorchWorker:
    """A :mod:`benchmarks.torch_worker` process: PyTorch with the OpenMP wait ``policy``
    (``""``: PyTorch's default, active spinning; ``"PASSIVE"``), ``TORCH_THREADS``
    threads. ``steps(k)`` returns the worker's own time for ``k`` steps; after each call
    the parent sleeps ``settle`` seconds, so spinning threads do not run into the next
    contender's time."""

    def __init__(self, policy: str, settle: float = 0.05) -> None:
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env,
        )  # fmt: skip
        self.settle = settle

    def ask(self, **request: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker died (exit {self.proc.wait()})")
        time.sleep(self.settle)
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
