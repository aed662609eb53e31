"""Let λ choose itself: a hypergradient-tuned λ against a cross-validated grid, on a task
where λ matters (digits with 30% of the training labels replaced).

1. ``wdjax.sweep`` with 3-fold cross-validation over a λ grid finds the best λ;
2. ``fit(..., tuner=Tuner(...))`` tunes λ during one run from held-out batches of the
   validation split, started from a small and a large λ₀, looking back one update
   (T1–T2, Luketina et al. 2016: ``horizon=1``) or the whole run (forward mode:
   ``horizon=inf``);
3. ``wdjax.timescale`` says what each λ means: the weights' averaging timescale in epochs.

All are then compared on the test split. Expect the one-step λ to sink toward its lower
bound (its horizon is biased toward small λ) and the whole-run λ to climb back late in
the run, to near the λ that minimizes the validation loss (see docs/lambda_tasks.md for
the measured table).

Run:  python examples/auto_lambda.py        (--quick: smoke run)
"""

from __future__ import annotations

import argparse

import wdjax
from wdjax.hypergradient import Tuner
from wdjax.lab import data, models, train, variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and λ values")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 60
    grid = [0.0, 1e-2] if args.quick else [0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    lr = 1e-2

    ds = variants.label_noise(data.load("digits"), 0.3, seed=0)
    model = models.create("mlp", input_shape=ds.input_shape, widths=(128,))

    def optimizer(lam: float):
        return wdjax.adamw(lr, lam, lr_coupling="schedule", max_learning_rate=lr)

    found = wdjax.sweep(
        ds, model=model, optimizer=optimizer(0.0), weight_decay=grid, folds=3, epochs=epochs,
        batch_size=64, progress=False,
    )  # fmt: skip
    print(f"{ds.summary()}; AdamW η={lr}, 3-fold cross-validation, {epochs} epochs:")
    print(found.table())
    best = found.chosen["weight_decay"]
    steps = len(ds.x_train) // 64

    def test_accuracy(result) -> float:
        state = result.state
        return train.evaluate(model, state.params, state.model_state, ds.arrays("test"))["accuracy"]

    fixed = train.fit(model, optimizer(best), ds, epochs=epochs, batch_size=64, progress=False)
    print(f"grid best λ = {best:g}: test accuracy {test_accuracy(fixed):.3f}", end="")
    if best > 0:
        tau = wdjax.timescale.timescale(
            best, learning_rate=lr, lr_coupling="schedule", max_learning_rate=lr,
            steps_per_epoch=steps, total_steps=epochs * steps, warn=False,
        )  # fmt: skip
        print(f" (τ = {tau.tau_epoch:.2g} epochs, Σc·λ = {tau.total_shrinkage:.2g})", end="")
    print()
    final = {}
    for horizon in (1, float("inf")):
        for lam0 in (1e-4, 1e-1):
            opt = optimizer(lam0)
            tuned = train.fit(
                model, opt, ds, epochs=epochs, batch_size=64, progress=False,
                tuner=Tuner(opt, learning_rate=0.05, bounds=(1e-6, 1.0), horizon=horizon),
            )  # fmt: skip
            final[horizon, lam0] = tuned.history[-1]["weight_decay"]
            print(
                f"tuned (horizon {horizon:g}) from λ₀ = {lam0:g}: final λ = "
                f"{final[horizon, lam0]:.2g}, test accuracy {test_accuracy(tuned):.3f}"
            )
    ends = ", ".join(f"{lam:.2g}" for lam in final.values())
    print(f"Conclusion: tuned λs ended at {ends} (horizon 1, 1, inf, inf); the grid chose {best:g}")


if __name__ == "__main__":
    main()
