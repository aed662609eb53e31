"""A PyTorch contender in a process of its own, so that each OpenMP wait policy (PyTorch's
default active spinning, or ``OMP_WAIT_POLICY=PASSIVE``) is measured as users run it: the
policy is read once, when the OpenMP runtime starts, so it cannot change inside a process.

The parent (``bench_throughput``) starts one worker per (policy, eager/compiled) and
interleaves its requests with the JAX contenders. Protocol: one JSON line per request on
stdin, one JSON line per answer on stdout:

    {"model": "mlp", "batch_size": 128, "length": 6, "compiled": false, "threads": 2,
     "device": "cpu"}
        -> {"first_call_s": ...}        build the model, AdamW and the data; one warm step
    {"steps": 6, "warm_s": 0.15} -> {"seconds": ...}   untimed calls of `steps` steps until
        `warm_s` seconds have passed (at least one), then `steps` timed
    {"matmul": true, "device": "cpu", "warm_s": 0.15} -> {"seconds": ...}   untimed 2048²
        f32 matmuls for `warm_s`, then one timed: the peak's PyTorch probe

Every step draws a fresh batch from the same ``batch_size * length`` examples
(``common.batch(..., n=...)``, the data the JAX contenders train on) by a random
permutation, as ``fit`` does."""

from __future__ import annotations

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from benchmarks import common, timing

    run = matmul = None
    for line in sys.stdin:
        req = json.loads(line)
        if "model" in req:
            torch.set_num_threads(req["threads"])
            n = req["batch_size"] * req["length"]
            data = common.batch(req["batch_size"], n=n)
            run = common.torch_epoch(
                req["model"], data, req["batch_size"], req["compiled"], req["device"]
            )
            t0 = time.perf_counter()
            run(1)
            out = {"first_call_s": time.perf_counter() - t0}
        elif "steps" in req:
            timing.warm(functools.partial(run, req["steps"]), req["warm_s"])  # after idling
            t0 = time.perf_counter()
            run(req["steps"])
            out = {"seconds": time.perf_counter() - t0}
        else:
            if matmul is None:
                matmul = common.torch_matmul(req["device"])
            timing.warm(matmul, req["warm_s"])
            t0 = time.perf_counter()
            matmul()
            out = {"seconds": time.perf_counter() - t0}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
