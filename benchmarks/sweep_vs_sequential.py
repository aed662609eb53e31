"""K λ values trained together by :func:`wdjax.sweep` vs K sequential ``fit`` runs.

Both sides do the same work — K runs of ``epochs`` epochs of the reference MLP on digits,
each epoch followed by a validation pass — in one process, after warm-up (compilation),
timed in interleaved rounds (A, B, B, A, ...; see ``timing.py``).

The sequential side is ``fit``'s loop with its compiled epoch reused across runs (λ set in
the optimizer state), since ``fit`` itself compiles anew on every call; the warm-up checks
that its first run matches ``fit`` and times one ``fit`` call, compilation included.

    python benchmarks/sweep_vs_sequential.py           # full: 10 epochs, 5 rounds
    python benchmarks/sweep_vs_sequential.py --quick   # smoke run: 1 epoch, 2 rounds
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import data, models, optimizers, train
from wdjax.sweeps import sweep

try:
    from benchmarks.timing import interleaved, ratio
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from timing import interleaved, ratio


def sequential(
    model: models.Model,
    opt: optax.GradientTransformation,
    ds: data.Dataset,
    weight_decays: list[float],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> list[train.TrainState]:
    """``fit(model, adamw(η, λ), ds, seed=seed, progress=False)`` for each λ, one after another,
    sharing one compiled epoch: per epoch the scan, the per-step metrics to the host and
    the record with its validation pass, as ``fit`` does."""
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    steps_per_epoch = x.shape[0] // batch_size
    step = _step(model, opt)
    states = []
    for wd in weight_decays:
        state = train.init_state(model, opt, jax.random.PRNGKey(seed))
        opt_state = optax.tree_utils.tree_set(state.opt_state, weight_decay=jnp.float32(wd))
        state = state._replace(opt_state=opt_state)
        for length in train.chunks(0, epochs * steps_per_epoch, steps_per_epoch, None):
            state, metrics = _run(step, state, x, y, batch_size, length)
            per_step = {k: np.asarray(v).tolist() for k, v in metrics.items()}
            train._epoch_record(model, state, ds, per_step, int(state.step) // steps_per_epoch)
        states.append(state)
    return states


_step = functools.cache(train.make_train_step)  # one step function, so one compilation
_run = jax.jit(train.run_steps, static_argnums=(0, 4, 5), donate_argnums=1)


def _relative_diff(a: Any, b: Any) -> float:
    """``max |a − b| / max |b|`` over all leaves: float32 rounding, not a different run."""
    leaves = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in leaves)
    return diff / max(float(np.max(np.abs(np.asarray(v)))) for _, v in leaves)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch, 2 rounds: a smoke run")
    p.add_argument("--members", type=int, default=16, help="K, the number of λ values")
    p.add_argument("--epochs", type=int, default=None, help="default: 10 (quick: 1)")
    p.add_argument("--rounds", type=int, default=None, help="default: 5 (quick: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="the CLI's default")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--widths", default="256,256", help="MLP hidden widths (the reference: 256,256)")
    args = p.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 5)

    ds = data.load("digits")
    widths = tuple(int(w) for w in args.widths.split(","))
    model = models.create(
        "mlp", input_shape=ds.input_shape, num_classes=ds.num_classes, widths=widths
    )
    wds = [0.0, *np.logspace(-5, -1, args.members - 1).tolist()]
    opt = optimizers.adamw(args.lr, wds[0])
    kw = {"epochs": epochs, "batch_size": args.batch_size}

    t0 = time.perf_counter()
    reference = train.fit(model, opt, ds, progress=False, **kw)
    fit_call_s = time.perf_counter() - t0
    first = sequential(model, opt, ds, wds[:1], **kw)[0]
    swept = sweep(ds, model=model, weight_decay=wds, learning_rate=[args.lr], progress=False, **kw)
    diffs = {
        "sequential_vs_fit": _relative_diff(first.params, reference.state.params),
        "sweep_vs_fit": _relative_diff(
            jax.tree.map(lambda a: a[0], swept.params), reference.state.params
        ),
    }
    assert max(diffs.values()) < 1e-4, diffs  # both sides train what fit trains

    results = interleaved(
        {
            "sweep": lambda: sweep(
                ds, model=model, weight_decay=wds, learning_rate=[args.lr], progress=False, **kw
            ),
            "sequential": lambda: jax.block_until_ready(sequential(model, opt, ds, wds, **kw)),
        },
        rounds=rounds,
        warmup=1,
    )
    out = {
        "device": str(jax.devices()[0]),
        "members": args.members,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "widths": widths,
        "chunk_size": swept.config["chunk_size"],
        **results,
        "ratio_median": ratio(results, "sweep", "sequential"),
        "ratio_best": ratio(results, "sweep", "sequential", "min_s"),
        "fit_call_s": fit_call_s,
        "max_param_diff": diffs,
    }
    print(
        f"K={args.members} λ values, {epochs} epochs, batch {args.batch_size}, {out['device']}, {len(jax.devices('cpu'))} CPU device(s)"
    )
    print(f"{'':12}{'median s':>10}{'q1 s':>8}{'q3 s':>8}{'min s':>8}{'max s':>8}{'rounds':>8}")
    for name in ("sweep", "sequential"):
        r = results[name]
        print(
            f"{name:12}{r['median_s']:10.3f}{r['q1_s']:8.3f}{r['q3_s']:8.3f}{r['min_s']:8.3f}{r['max_s']:8.3f}{r['rounds']:8d}"
        )
    print(
        f"ratio sweep/sequential: {out['ratio_median']:.3f} (medians), {out['ratio_best']:.3f} (best rounds)"
    )
    print(
        f"one fit() call, compilation included: {fit_call_s:.2f} s; max |Δparams| / max |params| vs fit: {diffs}"
    )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
