"""7. Checkpoint verification: what trust costs. A `TrainState` of an AdamW run over N
float32 parameters (params, mu, nu: 12·N bytes) saved and restored with
`wdjax.lab.checkpoint.Checkpointer`, with and without verification, interleaved.

Save with verification writes, then reads the checkpoint back and compares its CRC-32
checksums, shapes, dtypes and finiteness before older checkpoints may be deleted; without
it (`verify=False`) it only writes. Restore always verifies in the library; the
unverified contender is the bare orbax read of the same checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

import wdjax
from benchmarks.report import num, timing_table
from benchmarks.timing import interleaved, log
from wdjax.lab import checkpoint, train

TITLE = "7. Checkpoint verification"


def _state(n: int) -> train.TrainState:
    rows = max(1, n // 1024)
    params = {"kernel": jnp.full((rows, 1024), 0.01, jnp.float32), "bias": jnp.zeros(1024)}
    opt = wdjax.adamw(1e-3, 1e-4)
    zero = jnp.zeros([], jnp.int32)
    return train.TrainState(zero, params, opt.init(params), {}, jax.random.PRNGKey(0), zero)


def run(cfg: Any) -> dict[str, Any]:
    n = cfg.checkpoint_params
    state = _state(n)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    root = tempfile.mkdtemp(prefix="wdjax-bench-ckpt-")
    silent = {"log": lambda message: None, "keep": 1}
    try:
        savers = {
            name: checkpoint.Checkpointer(f"{root}/{name}", 1, verify=verify, **silent)
            for name, verify in (("save_verified", True), ("save_unverified", False))
        }
        counter = [0]

        def saver(ckpt: checkpoint.Checkpointer):
            def save():
                counter[0] += 1
                ckpt.save(state._replace(step=jnp.asarray(counter[0], jnp.int32)), [])

            return save

        reader = checkpoint.Checkpointer(f"{root}/read", 1, **silent)
        reader.save(state, [])
        step = reader.steps()[0]
        contenders = {name: saver(c) for name, c in savers.items()}
        contenders["restore_verified"] = lambda: reader.load(state)
        contenders["restore_unverified"] = lambda: jax.block_until_ready(reader._read(step, state))
        res = interleaved(contenders, rounds=cfg.checkpoint_rounds, warmup=1)
        for c in (*savers.values(), reader):
            c.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r in res.values():
        r["MB_per_s"] = state_bytes / r["median_s"] / 1e6
    out = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "params": n_params,
        "state_bytes": state_bytes,
        "contenders": res,
        "ratios": {
            "save_verified/save_unverified": res["save_verified"]["median_s"]
            / res["save_unverified"]["median_s"],
            "restore_verified/restore_unverified": res["restore_verified"]["median_s"]
            / res["restore_unverified"]["median_s"],
        },
        "target": "none: the cost is measured, not bounded",
    }
    log(f"checkpoint {n_params:,} params, MB/s", res, lambda v: num(v["MB_per_s"], ".0f"))
    return out


def summary(s: dict[str, Any]) -> list[list[str]]:
    r = s["ratios"]
    return [
        [
            f"7. checkpoint of {s['params']:,} params (AdamW state): verified / unverified",
            f"save {num(r['save_verified/save_unverified'], '.2f')}, "
            f"restore {num(r['restore_verified/restore_unverified'], '.2f')}",
            "measured",
            "–",
        ]
    ]


def render(s: dict[str, Any]) -> str:
    r = s["ratios"]
    return "\n\n".join(
        [
            f"## {TITLE}",
            s["what"],
            f"State: {s['params']:,} parameters, {s['state_bytes'] / 1e6:.0f} MB (params, mu, "
            f"nu, counts, hyperparameters). Target: {s['target']}.",
            timing_table(s["contenders"], extra={"MB/s": lambda v: num(v["MB_per_s"], ".0f")}),
            f"Verified save / unverified save: **{num(r['save_verified/save_unverified'], '.2f')}**"
            "; verified restore / bare orbax read: "
            f"**{num(r['restore_verified/restore_unverified'], '.2f')}**.",
        ]
    )
