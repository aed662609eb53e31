"""8. Scale-out: what the layout path costs on one device, member-sharded sweeps on a
simulated 8-device mesh, and the training stall of asynchronous vs synchronous
checkpoint saves. Measured in a child process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (set before JAX starts).

Layout overhead: one `fit` stretch (a `lax.scan` of steps of the reference MLP on
digits, batch 64) through `fit`'s runner without a layout, and with a one-device
`Layout` (explicit in/out shardings, batch constraint). Sweep: one epoch of 8 members
(λ × η grid), all on one device vs one member per simulated device (`members=8`); the
simulated devices share this machine's cores, so this measures what the sharding
costs or saves here, not what 8 real chips give. Checkpoint stall: steps of an AdamW
train step over ~N parameters, timed one by one, with a save every K steps,
`Checkpointer(asynchronous=True)` vs `asynchronous=False`; the stall is the extra time
of the steps that carry a save (and, async, the steps after it, while orbax writes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.report import num, table, timing_table
from benchmarks.timing import interleaved, log, summarize

TITLE = "8. Scale-out"


def run(cfg: Any) -> dict[str, Any]:
    """Measure in a child process with 8 simulated devices."""
    settings = {
        "rounds": cfg.scale_rounds,
        "scan": cfg.scale_scan,
        "ckpt_params": cfg.scale_ckpt_params,
        "ckpt_steps": cfg.scale_ckpt_steps,
        "ckpt_every": cfg.scale_ckpt_every,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scale.json")
        env = {  # on the host's CPU whatever the machine's accelerator
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu",
        }
        cmd = [sys.executable, "-m", "benchmarks.bench_scale", json.dumps(settings), out]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"the scale benchmark's process failed: {done.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def _layout_overhead(s: dict) -> dict[str, Any]:
    import jax

    import wdjax
    from wdjax import distributed
    from wdjax.lab import data, models, train

    digits = data.load("digits")
    model = models.create("mlp", input_shape=digits.input_shape)
    opt = wdjax.adamw(1e-3, 1e-4)
    layout = distributed.Layout(distributed.make_mesh("data=1", jax.devices()[:1]))
    runs = {}
    for name, where in (("no_layout", None), ("one_device_layout", layout)):
        step = train.make_train_step(model, opt, layout=where)
        state, shardings = train.init_state_on(where, model, opt, jax.random.PRNGKey(0))
        train_data = train._place(where, digits.arrays("train"))
        runner = train._Runner(step, shardings, where, 64, unroll=False)
        box = [state]

        def go(runner=runner, box=box, train_data=train_data) -> None:
            box[0], metrics = runner(box[0], train_data, s["scan"])
            jax.block_until_ready(metrics)

        runs[name] = go
    res = interleaved(runs, rounds=s["rounds"], warmup=2)
    log("layout overhead, ms per stretch", res, lambda v: num(v["median_s"] * 1e3, ".1f"))
    ratio = res["one_device_layout"]["median_s"] / res["no_layout"]["median_s"]
    return {"contenders": res, "ratio": ratio, "steps": s["scan"]}


def _sweep(s: dict) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import wdjax
    from wdjax import distributed, masks
    from wdjax.lab import data, models, sweeps, tasks, train

    digits = data.load("digits")
    task = tasks.as_task(models.create("mlp", input_shape=digits.input_shape))
    opt = wdjax.adamw(1e-3, 0.0)
    one = jax.devices()[0]
    runs = {}
    for name, spec in (("one_device", None), ("members_8", "members=8")):
        layout = None if spec is None else distributed.Layout(distributed.make_mesh(spec))
        _, epoch = sweeps._program(task, opt, 64, (), masks.DEFAULT, layout)
        state = train.init_state(task, opt, jax.random.PRNGKey(0))
        state = jax.tree.map(lambda a: jnp.stack([a] * 8), state)
        lams = jnp.array([0.0, 1e-4, 1e-3, 1e-2] * 2)
        state = state._replace(opt_state=wdjax.set_hyperparams(state.opt_state, weight_decay=lams))
        trn, val = digits.arrays("train"), digits.arrays("val")
        if layout is None:
            state, trn, val = jax.device_put((state, trn, val), one)
        else:
            state = layout.put(state, layout.members())
            trn, val = layout.put((trn, val), layout.replicated())
        box = [state]
        length = len(digits.x_train) // 64

        def go(epoch=epoch, box=box, trn=trn, val=val, length=length) -> None:
            box[0], record = epoch(box[0], trn, None, val, None, length)
            jax.block_until_ready(record)

        runs[name] = go
    res = interleaved(runs, rounds=max(3, s["rounds"] // 3), warmup=1)
    log("member-sharded sweep epoch, ms", res, lambda v: num(v["median_s"] * 1e3, ".0f"))
    ratio = res["members_8"]["median_s"] / res["one_device"]["median_s"]
    return {"contenders": res, "ratio": ratio, "members": 8}


def _checkpoint_stall(s: dict) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    import wdjax
    from wdjax.lab import checkpoint, train

    n = s["ckpt_params"]
    rows = max(1, n // 1024)
    params = {"kernel": jnp.full((rows, 1024), 0.01, jnp.float32), "bias": jnp.zeros(1024)}
    opt = wdjax.adamw(1e-3, 1e-4)
    zero = jnp.zeros([], jnp.int32)
    x = jnp.ones((8, rows), jnp.float32)

    def loss(p):
        return jnp.mean(jnp.tanh(x @ p["kernel"] + p["bias"]) ** 2)

    @jax.jit
    def step(state):
        grads = jax.grad(loss)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return state._replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )

    root = tempfile.mkdtemp(prefix="wdjax-bench-stall-")
    per_mode: dict[str, list[list[float]]] = {"async": [], "sync": []}
    totals: dict[str, list[float]] = {"async": [], "sync": []}
    try:
        for r in range(s["rounds"] // 3 + 2):
            for mode in ("async", "sync") if r % 2 == 0 else ("sync", "async"):
                path = os.path.join(root, f"{mode}-{r}")
                state = train.TrainState(
                    zero, params, opt.init(params), {}, jax.random.PRNGKey(0), zero
                )
                state = jax.block_until_ready(step(state))  # compiled
                times = []
                t_all = time.perf_counter()
                with checkpoint.Checkpointer(
                    path, s["ckpt_every"], keep=2, asynchronous=mode == "async", log=print
                ) as ckpt:
                    for i in range(1, s["ckpt_steps"] + 1):
                        t0 = time.perf_counter()
                        state = jax.block_until_ready(step(state))
                        if i % s["ckpt_every"] == 0:
                            ckpt.save(state, [])
                        times.append(time.perf_counter() - t0)
                    ckpt.wait()
                total = time.perf_counter() - t_all
                shutil.rmtree(path, ignore_errors=True)
                if r >= 1:  # round 0 warms the file system and orbax up
                    per_mode[mode].append(times)
                    totals[mode].append(total)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {}
    for mode, runs in per_mode.items():
        every = s["ckpt_every"]
        saving = [t[i] for t in runs for i in range(every - 1, len(t), every)]
        plain = [t[i] for t in runs for i in range(len(t)) if (i + 1) % every]
        out[mode] = {
            "step": summarize(plain),
            "save_step": summarize(saving),
            "total": summarize(totals[mode]),
            "max_step_s": max(max(t) for t in runs),
        }
    state_bytes = 3 * (rows * 1024 + 1024) * 4
    log(
        "checkpoint stall, ms (save step median)",
        out,
        lambda v: num(v["save_step"]["median_s"] * 1e3, ".0f"),
    )
    return {
        "modes": out,
        "state_bytes": state_bytes,
        "steps": s["ckpt_steps"],
        "every": s["ckpt_every"],
        "ratio_total": out["async"]["total"]["median_s"] / out["sync"]["total"]["median_s"],
        "ratio_save_step": out["async"]["save_step"]["median_s"]
        / out["sync"]["save_step"]["median_s"],
    }


def _child(settings: dict, path: str) -> None:
    import jax

    from benchmarks.common import environment

    result = {
        "what": __doc__.split("\n\n", 1)[1].replace("\n", " "),
        "devices": len(jax.devices()),
        "environment": environment(),
        "layout": _layout_overhead(settings),
        "sweep": _sweep(settings),
        "checkpoint": _checkpoint_stall(settings),
        "target": "layout path on one device ≤ 1.02× no layout",
    }
    from benchmarks.run import jsonable

    with open(path, "w") as f:
        json.dump(jsonable(result), f)


def summary(s: dict[str, Any]) -> list[list[str]]:
    lay, sw, ck = s["layout"]["ratio"], s["sweep"]["ratio"], s["checkpoint"]
    return [
        ["8. `fit` stretch with a one-device Layout / without", num(lay), "≤ 1.02", _met(lay)],
        ["8. sweep epoch, 8 members on 8 simulated devices / on one", num(sw), "–", "measured"],
        [
            "8. steps with a checkpoint save: async / sync (median)",
            num(ck["ratio_save_step"]),
            "< 1",
            _met(ck["ratio_save_step"], 1.0, strict=True),
        ],
    ]


def _met(value: float, bound: float = 1.02, strict: bool = False) -> str:
    ok = value < bound if strict else value <= bound
    return "yes" if ok else "**no**"


def render(s: dict[str, Any]) -> str:
    ck = s["checkpoint"]
    rows = [
        [
            mode,
            num(v["step"]["median_s"] * 1e3, ".1f"),
            num(v["save_step"]["median_s"] * 1e3, ".1f"),
            num(v["max_step_s"] * 1e3, ".1f"),
            num(v["total"]["median_s"], ".2f"),
        ]
        for mode, v in ck["modes"].items()
    ]
    stall = table(
        ["saves", "step median ms", "step with a save, median ms", "slowest step ms", "run s"],
        rows,
    )
    return "\n\n".join(
        [
            f"## {TITLE}",
            s["what"],
            f"Devices in the measuring process: {s['devices']} (simulated). Target: {s['target']}.",
            f"### Layout path on one device ({s['layout']['steps']} steps per stretch)",
            timing_table(s["layout"]["contenders"], "no_layout"),
            f"### Sweep epoch, {s['sweep']['members']} members",
            timing_table(s["sweep"]["contenders"], "one_device"),
            f"### Checkpoint stall ({ck['state_bytes'] / 1e6:.0f} MB state, a save every "
            f"{ck['every']} of {ck['steps']} steps)",
            stall,
            f"Async / sync: steps that carry a save **{num(ck['ratio_save_step'])}**, whole "
            f"run **{num(ck['ratio_total'])}**.",
        ]
    )


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]), sys.argv[2])
