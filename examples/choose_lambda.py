"""Choose the weight decay λ by k-fold cross-validation with ``wdjax.sweep``, then retrain with it.

On the clean digits every λ is within noise of λ = 0 (measured in docs/lambda_tasks.md),
so a choice there cannot help; this uses digits with 30% of the training labels replaced
(``wdjax.lab.variants.label_noise``), where it does, and AdamW at η = 1e-2 with
``lr_coupling="schedule"`` (λ is the per-step shrink factor).

``wdjax.sweep`` trains every (λ, fold) pair of an MLP with AdamW as one vmapped
program: train + val are pooled and dealt into ``--folds`` stratified folds, each
member trains on all folds but one and is scored on the one held out. The table
gives mean ± std over folds; the choice follows the one-standard-error rule (the
largest λ whose mean validation accuracy is within one standard error of the best),
which prefers the simpler, more regularized model when the data cannot tell the
difference.

The chosen λ is then used to retrain on all of train + val, and its test accuracy
is compared with the same model retrained without weight decay.

Run:  python examples/choose_lambda.py        (--quick: smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

import wdjax
from wdjax.lab import data, models, train, variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer λ values, folds and epochs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    lambdas = [0.0, 1e-2, 1e-1] if args.quick else [0.0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    folds, epochs = (3, 2) if args.quick else (args.folds, args.epochs)
    lr = 1e-2
    coupling = {"lr_coupling": "schedule", "max_learning_rate": lr}

    ds = variants.label_noise(data.load("digits"), 0.3, seed=0)
    model = models.create("mlp", input_shape=ds.input_shape, num_classes=ds.num_classes)
    result = wdjax.sweep(
        ds,
        model=model,
        optimizer="adamw",
        optimizer_config=coupling,
        weight_decay=lambdas,
        learning_rate=[lr],
        folds=folds,
        epochs=epochs,
        batch_size=64,
        select="one_se",
        progress=False,
    )
    print(
        f"AdamW (lr {lr}, schedule coupling) on {ds.name}, {folds}-fold cross-validation, "
        f"{epochs} epochs per member:"
    )
    print(result.table())
    chosen = result.chosen
    best = max(result.settings, key=lambda s: s["val_accuracy_mean"])

    # retrain on all of train + val with the chosen λ, the best-mean λ, and without decay
    pooled = dataclasses.replace(
        ds,
        x_train=np.concatenate([ds.x_train, ds.x_val]),
        y_train=np.concatenate([ds.y_train, ds.y_val]),
    )
    test = {}
    for lam in dict.fromkeys([chosen["weight_decay"], best["weight_decay"], 0.0]):
        fit = train.fit(
            model,
            wdjax.adamw(lr, lam, **coupling),
            pooled,
            epochs=epochs,
            batch_size=64,
            progress=False,
        )
        state = fit.state
        metrics = train.evaluate(model, state.params, state.model_state, ds.arrays("test"))
        test[lam] = metrics["accuracy"]
        print(
            f"retrained on train+val ({len(pooled.y_train)} images) with λ={lam:g}: "
            f"test accuracy {test[lam]:.1%}"
        )

    lam, lam_best = chosen["weight_decay"], best["weight_decay"]
    se = math.sqrt(test[0.0] * (1 - test[0.0]) / len(ds.y_test))
    diff = test[lam] - test[0.0]
    print(
        f"\nConclusion: {folds}-fold cross-validation with the one-SE rule chose λ={lam:g} (mean "
        f"val accuracy {chosen['val_accuracy_mean']:.1%} ± {chosen['val_accuracy_se']:.1%} SE; the "
        f"best mean was {best['val_accuracy_mean']:.1%} at λ={lam_best:g}); retrained with it, the "
        f"model reached {test[lam]:.1%} test accuracy vs {test[0.0]:.1%} without weight decay"
        + (f" and {test[lam_best]:.1%} with λ={lam_best:g}" if lam_best not in (lam, 0.0) else "")
        + f" ({diff * 100:+.2f} pp vs no decay, "
        + ("within" if abs(diff) <= 2 * se else "beyond")
        + f" 2 standard errors = {2 * se * 100:.2f} pp on {len(ds.y_test)} test images)."
    )


if __name__ == "__main__":
    main()
