"""A training run in a fresh process, for the scale-out tests (tests/test_scale.py).

    python scale_worker.py DEVICES OUT.json [--mesh SPEC] [--epochs N] [--ckpt DIR]
                           [--cluster HOST:PORT,PROCESSES,ID]

sets the CPU device count before JAX starts, joins a cluster of local processes (gloo
collectives) when asked, runs `fit` on digits with the MLP of the tests and writes its
history, final params and the placement of the state to OUT.json (every process its own).
Under a cluster it first checks that `fit` without a layout refuses to run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("devices", type=int)
parser.add_argument("out")
parser.add_argument("--mesh")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--ckpt")
parser.add_argument("--cluster")
parser.add_argument("--feed", default="device")
parser.add_argument("--sweep", action="store_true")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if args.cluster:
    address, processes, index = args.cluster.split(",")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, int(processes), int(index))

sys.path.insert(0, os.path.dirname(__file__))
from helpers import SWEEP_GRID, scale_run  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from wdjax import distributed  # noqa: E402
from wdjax.lab import checkpoint, train  # noqa: E402

run = scale_run()
MODEL, OPTIMIZER, DATA, KWARGS = run["model"], run["optimizer"], run["data"], run["kwargs"]

report: dict = {"process": jax.process_index(), "processes": jax.process_count()}
if jax.process_count() > 1:
    try:
        train.fit(MODEL, OPTIMIZER, DATA, epochs=1, progress=False)
        report["guard"] = None
    except ValueError as e:
        report["guard"] = str(e)

layout = None
if args.mesh:
    layout = distributed.Layout(distributed.make_mesh(args.mesh), fsdp_min_bytes=0)


class Rows:
    """Host training data that counts the rows read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.read, self.shape = array, 0, array.shape

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        self.read += np.size(rows)
        return self.array[rows]


data = DATA
if args.feed == "host":
    data = ({k: Rows(v) for k, v in DATA.arrays("train").items()}, DATA.arrays("val"))
ckpt = checkpoint.Checkpointer(args.ckpt, every=7, keep=3) if args.ckpt else None
try:
    result = train.fit(
        MODEL, OPTIMIZER, data, epochs=args.epochs, layout=layout, checkpoints=ckpt,
        feed=args.feed, **KWARGS,
    )  # fmt: skip
finally:
    if ckpt is not None:
        ckpt.close()
params = jax.tree.map(
    lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
    result.state.params,
)
report |= {
    "history": result.history,
    "params": [x.ravel().tolist() for x in jax.tree.leaves(params)],
    "specs": [str(getattr(x.sharding, "spec", "single")) for x in jax.tree.leaves(result.state)],
    "devices": jax.device_count(),
    "rows_read": data[0]["x"].read if args.feed == "host" else None,
}
if args.sweep:
    import wdjax

    members = distributed.Layout(distributed.make_mesh("members=-1"))
    found = wdjax.sweep(DATA, model=MODEL, layout=members, **SWEEP_GRID)
    report["sweep"] = {"val_loss": found.history["val_loss"].tolist(), "chosen": found.chosen_index}
with open(args.out, "w") as f:
    json.dump(report, f)
