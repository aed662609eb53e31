"""Weight decay with the rest of the toolbox: dropout, batch norm, early stopping, a learning-rate
schedule and gradient clipping, added one at a time to an MLP on scikit-learn's digits.

Each row of the table keeps everything above it and adds one technique:

1. Adam alone;
2. + decoupled weight decay on the kernels (``wdjax.adamw``);
3. + dropout 0.2 after each hidden layer;
4. + batch norm; the decay stays masked off the normalization scales and offsets
   (``masks.default()`` selects kernels only; ``masks.describe`` prints which
   parameters are decayed);
5. + early stopping on the validation loss (``fit(patience=...)`` keeps the best state);
6. + a cosine learning-rate schedule (the decay follows it: ``c_t = η_t``);
7. + gradient clipping to global norm 1 (``optax.clip_by_global_norm`` chained before AdamW).

Digits is small (359 test images), so the script prints the binomial standard
error of a test accuracy and says which steps moved it by more than two of them.

Run:  python examples/regularization_toolbox.py   (--quick: smoke run; --seeds N to average)
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
import optax

import wdjax
from wdjax import masks
from wdjax.lab import data, models, train

STEPS = [  # (row label, what it changes); each row keeps the changes above it
    ("Adam (lr 1e-3), nothing else", {}),
    ("+ weight decay (AdamW λ=0.5)", {"weight_decay": 0.5}),
    ("+ dropout 0.2", {"dropout": 0.2}),
    ("+ batch norm (not decayed)", {"batch_norm": True}),
    ("+ early stopping (patience 5)", {"patience": 5}),
    ("+ cosine learning-rate decay", {"schedule": True}),
    ("+ gradient clipping (norm 1)", {"clip": 1.0}),
]


def optimizer(steps, weight_decay=0.0, schedule=False, clip=None):
    lr = optax.cosine_decay_schedule(1e-3, steps) if schedule else 1e-3
    opt = wdjax.adamw(lr, weight_decay, mask=masks.default())
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="a few epochs, first and last rows")
    parser.add_argument("--seeds", type=int, default=1, help="runs averaged per row")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 40
    ds = data.load("digits")
    steps = epochs * (len(ds.y_train) // 64)

    bn_model = models.create("mlp", input_shape=ds.input_shape, num_classes=10, batch_norm=True)
    print("Which parameters weight decay touches once batch norm is in (masks.default()):")
    masks.describe(bn_model.init(jax.random.PRNGKey(0))[0], masks.default(), rate=0.5)

    print(f"\n{'':<31}  {'epochs':>6}  {'train':>6}  {'val':>6}  {'test':>6}  {'kernel ‖w‖':>10}")
    settings, results = {}, []
    for i, (label, change) in enumerate(STEPS):
        settings |= change
        if args.quick and 0 < i < len(STEPS) - 1:
            continue  # --quick: only the first and last rows (the last has every technique)
        model = models.create(
            "mlp",
            input_shape=ds.input_shape,
            num_classes=10,
            dropout=settings.get("dropout", 0.0),
            batch_norm=settings.get("batch_norm", False),
        )
        runs = []
        for seed in range(args.seeds):
            opt = optimizer(
                steps,
                settings.get("weight_decay", 0.0),
                settings.get("schedule", False),
                settings.get("clip"),
            )
            fit = train.fit(
                model,
                opt,
                ds,
                epochs=epochs,
                batch_size=64,
                seed=seed,
                patience=settings.get("patience"),
                progress=False,
            )
            p, s = fit.state.params, fit.state.model_state
            accs = [
                train.evaluate(model, p, s, ds.arrays(split))["accuracy"]
                for split in ("train", "val", "test")
            ]
            norm = train.weight_metrics(p, masks.resolve(p, masks.default()))["weight_norm_decayed"]
            runs.append((len(fit.history), *accs, float(norm)))
        n_epochs, tr, va, te, norm = np.mean(runs, axis=0)
        results.append((label, te))
        print(f"{label:<31}  {n_epochs:6.0f}  {tr:6.1%}  {va:6.1%}  {te:6.1%}  {norm:10.2f}")

    base, full = results[0][1], results[-1][1]
    se = math.sqrt(base * (1 - base) / (len(ds.y_test) * args.seeds))
    gains = [(label, te - prev) for (_, prev), (label, te) in zip(results, results[1:])]
    best_label, best_gain = max(gains, key=lambda g: g[1])
    significant = [label.lstrip("+ ").split(" (")[0] for label, g in gains if abs(g) > 2 * se]
    print(
        f"\nConclusion: on digits the whole toolbox reached {full:.1%} test accuracy vs {base:.1%} "
        f"for plain Adam ({(full - base) * 100:+.1f} pp); the largest single step was "
        f"'{best_label.lstrip('+ ')}' ({best_gain * 100:+.1f} pp). With a standard error of "
        f"{se * 100:.1f} pp per accuracy, "
        + (
            f"only {', '.join(significant)} moved test accuracy by more than 2 standard errors"
            if significant
            else "no single step moved test accuracy by more than 2 standard errors"
        )
        + f" ({len(significant)} of {len(gains)})."
    )


if __name__ == "__main__":
    main()
