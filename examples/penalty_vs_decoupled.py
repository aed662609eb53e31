"""L2 in the loss vs coupled L2 vs decoupled weight decay, and learning-rate decay vs weight decay.

Three ways to "add weight decay" to an optimizer, on an MLP on scikit-learn's digits:

* L2 in the loss: ``wdjax.l2(λ)`` (``λ/2·Σw²``) added to the loss, plain optimizer;
* coupled L2: ``g ← g + λ·w`` before the optimizer (``wdjax.sgd_l2``, ``wdjax.adam_l2``;
  PyTorch ``SGD``/``Adam(weight_decay=λ)``);
* decoupled decay: ``u ← u − η·λ·w`` after it (``wdjax.sgdw``, ``wdjax.adamw``).

A. With plain SGD all three are the same update, ``w ← w − η·(g + λ·w)``: the
   trained weights agree to float32 rounding. (With momentum, decoupled differs.)
B. With Adam, L2 in the loss and coupled L2 are still the same, but the λ·w term
   passes through Adam's per-coordinate normalization, whereas decoupled decay
   does not: for the same λ the weight norms and accuracies differ a lot.
C. Learning-rate decay (a cosine schedule) and weight decay are often confused:
   the first shrinks the *steps*, the second the *weights*. The table shows the
   kernel norm and test accuracy of each, and of both.

Run:  python examples/penalty_vs_decoupled.py        (--quick: smoke run)
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax

import wdjax
from wdjax import masks
from wdjax.lab import data, models, train


def max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and λ values")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 30
    adam_lambdas = [1e-1] if args.quick else [1e-2, 1e-1]

    ds = data.load("digits")
    model = models.create("mlp", input_shape=ds.input_shape, num_classes=10)
    kernels = masks.default()  # what the wdjax optimizers decay by default

    def run(opt, penalties=(), n_epochs=epochs):
        fit = train.fit(
            model,
            opt,
            ds,
            epochs=n_epochs,
            batch_size=64,
            seed=args.seed,
            penalties=penalties,
            progress=False,
        )
        p = fit.state.params
        acc = train.evaluate(model, p, fit.state.model_state, ds.arrays("test"))["accuracy"]
        return p, acc, fit.history[-1]["weight_norm_decayed"]

    # A. SGD: penalty, coupled and decoupled are one and the same update
    lr, lam, n = 0.05, 5e-3, min(epochs, 5)
    sgd_loss = run(optax.sgd(lr), [wdjax.l2(lam, kernels)], n)[0]
    sgd_coupled = run(wdjax.sgd_l2(lr, lam), n_epochs=n)[0]
    sgd_decoupled = run(wdjax.sgdw(lr, lam), n_epochs=n)[0]
    sgd_diff = max(max_diff(sgd_loss, sgd_coupled), max_diff(sgd_loss, sgd_decoupled))
    mom_diff = max_diff(
        run(wdjax.sgd_l2(lr, lam, momentum=0.9), n_epochs=n)[0],
        run(wdjax.sgdw(lr, lam, momentum=0.9), n_epochs=n)[0],
    )
    print(
        f"A. SGD (lr={lr}, λ={lam}, {n} epochs): max |Δw| between L2-in-loss, coupled and "
        f"decoupled = {sgd_diff:.1e}; with momentum 0.9, coupled vs decoupled = {mom_diff:.1e}"
    )

    # B. Adam: the λ·w term is normalized by Adam when coupled, not when decoupled
    _, base_acc, base_norm = run(optax.adam(1e-3))
    print(
        f"\nB. Adam (lr=1e-3, {epochs} epochs); no decay: test acc {base_acc:.1%}, "
        f"kernel norm {base_norm:.1f}"
    )
    print(
        f"{'λ':>6}  {'method':<22}  {'test acc':>8}  {'kernel ‖w‖':>10}  "
        f"{'max |Δw| vs L2-in-loss':>22}"
    )
    adam = {}
    for lam in adam_lambdas:
        ref = None
        for name, opt, pen in [
            ("L2 in loss + adam", optax.adam(1e-3), [wdjax.l2(lam, kernels)]),
            ("coupled (adam_l2)", wdjax.adam_l2(1e-3, lam), []),
            ("decoupled (adamw)", wdjax.adamw(1e-3, lam), []),
        ]:
            params, acc, norm = run(opt, pen)
            ref = params if ref is None else ref
            diff = max_diff(params, ref)
            adam[lam, name.split()[0]] = (acc, norm, diff)
            print(f"{lam:6g}  {name:<22}  {acc:8.1%}  {norm:10.2f}  {diff:22.1e}")

    # C. learning-rate decay vs weight decay (SGD + momentum; decay rate in AdamW units)
    steps = epochs * (len(ds.y_train) // 64)
    cosine = optax.cosine_decay_schedule(0.05, steps)

    def sgd(learning_rate, wd):  # SGD + momentum, then decoupled decay u ← u − η_t·λ·w
        return wdjax.sgdw(learning_rate, wd, momentum=0.9, mask=kernels)

    print(f"\nC. SGD+momentum, lr 0.05, {epochs} epochs")
    print(f"{'setting':<28}  {'test acc':>8}  {'kernel ‖w‖':>10}")
    lr_wd = {}
    for name, opt in [
        ("constant lr, no decay", sgd(0.05, 0.0)),
        ("cosine lr decay", sgd(cosine, 0.0)),
        ("weight decay λ=0.05", sgd(0.05, 0.05)),
        ("cosine lr + weight decay", sgd(cosine, 0.05)),
    ]:
        _, acc, norm = run(opt)
        lr_wd[name] = (acc, norm)
        print(f"{name:<28}  {acc:8.1%}  {norm:10.2f}")

    # conclusions, from the numbers above
    lam = adam_lambdas[-1]
    (l_acc, l_norm, _), (c_acc, c_norm, c_diff), (d_acc, d_norm, d_diff) = (
        adam[lam, k] for k in ("L2", "coupled", "decoupled")
    )
    (n_acc, n_norm), (s_acc, s_norm), (w_acc, w_norm), _ = lr_wd.values()
    se = math.sqrt(n_acc * (1 - n_acc) / len(ds.y_test))  # binomial SE of a test accuracy
    acc_spread = max(a for a, _ in lr_wd.values()) - min(a for a, _ in lr_wd.values())
    print(
        "\nConclusion: with SGD, L2 in the loss, coupled L2 and decoupled decay gave "
        + (
            "the same weights up to float32 rounding"
            if sgd_diff < 1e-3 * mom_diff
            else "DIFFERENT weights"
        )
        + f" (max |Δw| = {sgd_diff:.1e}, vs {mom_diff:.1e} between coupled and decoupled once "
        "momentum is added). "
        f"With Adam at λ={lam:g}, L2 in the loss and coupled L2 "
        + ("agree" if c_diff < 0.1 * d_diff else "differ")
        + f" (max |Δw| {c_diff:.1e}, test acc {l_acc:.1%} vs {c_acc:.1%}, kernel norm "
        f"{l_norm:.1f} vs {c_norm:.1f}) but decoupled decay does not (max |Δw| {d_diff:.1e}, "
        f"test acc {d_acc:.1%}, kernel norm {d_norm:.1f}; no decay: {base_acc:.1%}, "
        f"{base_norm:.1f}). Learning-rate decay changed the kernel norm by "
        f"{s_norm / n_norm - 1:+.0%} ({n_norm:.1f} → {s_norm:.1f}), weight decay by "
        f"{w_norm / n_norm - 1:+.0%} ({w_norm:.1f}); test accuracies of the four settings span "
        f"{acc_spread * 100:.1f} pp, "
        + ("within" if acc_spread <= 2 * se else "more than")
        + f" 2 standard errors ({2 * se * 100:.1f} pp on {len(ds.y_test)} test images)."
    )


if __name__ == "__main__":
    main()
