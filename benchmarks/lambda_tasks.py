"""Where does λ matter, and does a self-tuned λ find it? Measures, on digits variants:

1. the validation-accuracy-vs-λ curve of a cross-validated sweep (mean ± standard error
   over seeds × folds) and the gap between the best λ and λ = 0, in standard errors;
2. on the noisiest task, the hypergradient tuner (`wdjax.hypergradient.Tuner`), one-step
   and whole-run, started from several λ₀: its final λ, its test accuracy, and its wall
   time against one plain run, next to fixed λs on the same split and the grid's best λ
   retrained on the same seeds; and the controls that compute the hypergradient on
   training data.

    python benchmarks/lambda_tasks.py            # writes docs/lambda_tasks.md and the JSON
    python benchmarks/lambda_tasks.py --quick    # a smoke run, nothing written
    python benchmarks/lambda_tasks.py --only-tuner   # re-measure section 2 into the JSON

The MLP (one hidden layer of 128), AdamW at η = 1e-2 with `lr_coupling="schedule"`
(so λ is the per-step shrink factor), batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import wdjax  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from wdjax import timescale  # noqa: E402
from wdjax.hypergradient import Tuner  # noqa: E402
from wdjax.lab import data, models, train, variants  # noqa: E402

LR = 1e-2
NOTE = (
    "The folds pool the (noisy) training labels with the (clean) validation labels, so on "
    "the noisy tasks the cross-validated accuracy is capped near 0.7; the test split is "
    "clean. The gap counts as real when it exceeds two standard errors of the difference."
)
GRID = [0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def tasks(base: data.Dataset) -> dict[str, data.Dataset]:
    return {
        "digits": base,
        "digits+noise0.3": variants.label_noise(base, 0.3, 0),
        "digits+frac0.25": variants.subsample(base, 0.25, 0),
        "digits+frac0.25+noise0.3": variants.label_noise(variants.subsample(base, 0.25, 0), 0.3, 0),
    }


def _optimizer(lam: float):
    return wdjax.adamw(LR, lam, lr_coupling="schedule", max_learning_rate=LR)


def curve(ds: data.Dataset, epochs: int, seeds: tuple[int, ...], folds: int) -> dict:
    model = models.create("mlp", input_shape=ds.input_shape, widths=(128,))
    result = wdjax.sweep(
        ds, model=model, optimizer=_optimizer(0.0), weight_decay=GRID, seeds=seeds,
        folds=folds, epochs=epochs, batch_size=64, progress=False,
    )  # fmt: skip
    rows = [
        {
            "lambda": s["weight_decay"],
            "val_accuracy": s["val_accuracy_mean"],
            "se": s["val_accuracy_se"],
            "val_loss": s["val_loss_mean"],
        }
        for s in result.settings
    ]
    best = max(rows, key=lambda r: r["val_accuracy"])
    zero = rows[0]
    gap = best["val_accuracy"] - zero["val_accuracy"]
    se = float(np.hypot(best["se"], zero["se"])) or float("nan")
    return {"rows": rows, "best": best["lambda"], "gap": gap, "gap_in_se": gap / se}


def tuner_runs(ds: data.Dataset, epochs: int, seeds: tuple[int, ...], best: float) -> dict:
    """The tuner from each λ₀, looking back one update (T1–T2) or the whole run (forward
    mode), against fixed λs trained on the same split (the tuner's own grid) and the
    cross-validated best λ retrained; controls tuned on the training data."""
    model = models.create("mlp", input_shape=ds.input_shape, widths=(128,))
    test = ds.arrays("test")

    def run(lam0: float, seed: int, tuner_kw: dict | None, data_=ds) -> dict:
        opt = _optimizer(lam0)
        tuner = None
        if tuner_kw is not None:
            tuner = Tuner(opt, learning_rate=0.05, bounds=(1e-6, 1.0), **tuner_kw)
        t0 = time.perf_counter()
        r = train.fit(
            model, opt, data_, epochs=epochs, batch_size=64, seed=seed, progress=False,
            tuner=tuner,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        acc = train.evaluate(model, r.state.params, r.state.model_state, test)["accuracy"]
        last = r.history[-1]
        return {"lambda": last["weight_decay"], "test_accuracy": acc, "seconds": seconds,
                "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"]}  # fmt: skip

    def runs(lam0: float, tuner_kw: dict | None, data_=ds) -> dict:
        got = [run(lam0, s, tuner_kw, data_) for s in seeds]
        return {k: [g[k] for g in got] for k in got[0]}

    modes = {"one step": {}, "whole run": {"horizon": float("inf")}}
    for _ in range(2):  # compile every program before timing
        for kw in modes.values():
            run(1e-4, 0, kw)
        run(best, 0, None)
    out: dict = {"starts": {}}
    for mode, kw in modes.items():
        for lam0 in (1e-6, 1e-4, 1e-1):
            out["starts"][f"{mode}, λ₀ = {lam0:g}"] = runs(lam0, kw)
    out["starts"]["one step + neumann=5, λ₀ = 0.1"] = runs(1e-1, {"neumann": 5})
    out["grid_best"] = {**runs(best, None), "lambda": best}
    out["split_grid"] = {f"{lam:g}": runs(lam, None) for lam in GRID[1:]}
    train_only = (ds.arrays("train"), ds.arrays("train"))
    out["control_on_training_data"] = {
        mode: runs(1e-1, kw, train_only)["lambda"] for mode, kw in modes.items()
    }
    return out


def cpr_runs(ds: data.Dataset, epochs: int, seeds: tuple[int, ...], knobs: tuple[int, ...]):
    """Test accuracy of AdamW at each λ of the grid and of Adam + CPR (untuned: the
    inflection-point bound) at each `reg_step_size`, over `seeds`."""
    import optax

    model = models.create("mlp", input_shape=ds.input_shape, widths=(128,))
    test = ds.arrays("test")

    def accuracy(opt, seed: int) -> float:
        r = train.fit(model, opt, ds, epochs=epochs, batch_size=64, seed=seed, progress=False)
        return train.evaluate(model, r.state.params, r.state.model_state, test)["accuracy"]

    adamw = {str(lam): [accuracy(_optimizer(lam), s) for s in seeds] for lam in GRID}
    cpr = {
        str(k): [
            accuracy(optax.chain(optax.adam(LR), wdjax.cpr(reg_step_size=k)), s) for s in seeds
        ]
        for k in knobs
    }
    return {"adamw": adamw, "cpr": cpr}


def optuna_vs_sweep(ds: data.Dataset, epochs: int, trials: int) -> dict:
    """The same budget of λ values spent two ways, on the validation split: Optuna's TPE
    over log λ (one `fit` per trial, as a user runs it) and one `wdjax.sweep` of a
    log-spaced grid of the same size. Best validation accuracy against wall time."""
    try:
        import optuna
    except ImportError:
        return {"skipped": "optuna is not installed (pip install optuna)"}
    model = models.create("mlp", input_shape=ds.input_shape, widths=(128,))
    grid = np.geomspace(1e-4, 1e-1, trials).tolist()
    t0 = time.perf_counter()
    swept = wdjax.sweep(
        ds, model=model, optimizer=_optimizer(0.0), weight_decay=grid, epochs=epochs,
        batch_size=64, progress=False,
    )  # fmt: skip
    sweep_s = time.perf_counter() - t0
    sweep_best = max(s["val_accuracy_mean"] for s in swept.settings)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trace = []
    t0 = time.perf_counter()

    def objective(trial) -> float:
        lam = trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True)
        r = train.fit(model, _optimizer(lam), ds, epochs=epochs, batch_size=64, progress=False)
        acc = r.history[-1]["val_accuracy"]
        trace.append((time.perf_counter() - t0, acc, lam))
        return acc

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    best = max(sweep_best, max(a for _, a, _ in trace))
    reached = [t for t, a, _ in trace if a >= best - 0.005]
    return {
        "trials": trials,
        "sweep_seconds": sweep_s,
        "sweep_best": sweep_best,
        "sweep_best_lambda": swept.chosen["weight_decay"],
        "optuna_best": study.best_value,
        "optuna_best_lambda": study.best_params["weight_decay"],
        "optuna_trace": trace,
        "optuna_seconds_to_within_half_pp": reached[0] if reached else None,
        "sweep_within_half_pp": sweep_best >= best - 0.005,
    }


FACTORS = {"fraction": (0.5, 1.0), "batch": (32, 128), "width": (64, 256), "epochs": (30, 60)}
FACTOR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def timescale_factorial(base: data.Dataset, seeds: tuple[int, ...], factors: dict) -> dict:
    """In each cell of data fraction × batch × width × epochs (noisy digits), a λ sweep
    locates λ*; τ*_epoch = 1/(c·λ*·steps_per_epoch) with c = 1 (the schedule coupling
    at a constant η). Also: λ moved from the smallest cell to each other cell by a
    constant τ_epoch, against reusing the smallest cell's λ (both added to the grid)."""
    import itertools

    cells = list(itertools.product(*factors.values()))
    out, source = [], None
    for fraction, batch, width, epochs in cells:
        ds = variants.label_noise(variants.subsample(base, fraction, 0), 0.3, 0)
        steps = len(ds.x_train) // batch
        grid = list(FACTOR_GRID)
        if source is not None:
            moved = timescale.transfer(
                source["lambda"], rule="constant_tau_epoch",
                source={"c": 1.0, "batch_size": source["batch"], "dataset_size": source["n"]},
                target={"c": 1.0, "batch_size": batch, "dataset_size": len(ds.x_train)},
            )  # fmt: skip
            grid = sorted(set(grid) | {moved})
        model = models.create("mlp", input_shape=ds.input_shape, widths=(width,))
        swept = wdjax.sweep(
            ds, model=model, optimizer=_optimizer(0.0), weight_decay=grid, seeds=seeds,
            epochs=epochs, batch_size=batch, progress=False,
        )  # fmt: skip
        acc = {s["weight_decay"]: s["val_accuracy_mean"] for s in swept.settings}
        best = max(acc, key=acc.get)
        cell = {
            "fraction": fraction, "batch": batch, "width": width, "epochs": epochs,
            "n": len(ds.x_train), "lambda": best, "tau_epoch": 1.0 / (best * steps),
            "best_accuracy": acc[best],
        }  # fmt: skip
        if source is None:
            source = cell
        else:
            cell |= {
                "transferred_lambda": moved,
                "transferred_accuracy": acc[moved],
                "reused_accuracy": acc[source["lambda"]],
            }
        out.append(cell)
        print(f"  cell {fraction} {batch} {width} {epochs}: λ* {best:g}", flush=True)
    logs = lambda key: np.log10([c[key] for c in out])  # noqa: E731
    return {
        "cells": out,
        "spread_log10_lambda": float(np.std(logs("lambda"))),
        "spread_log10_tau_epoch": float(np.std(logs("tau_epoch"))),
    }


def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def render(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Where λ matters: measured",
        "",
        f"Generated by `{results['command']}` on {env['cpu']} ({env['cpu_count']} cores), "
        f"{env['date']}; JSON: `{results['json']}`. MLP(128) on digits variants, AdamW η = "
        f'{LR:g} with `lr_coupling="schedule"` (λ is the per-step shrink factor), batch 64, '
        f"{results['epochs']} epochs; {len(results['seeds'])} seeds × {results['folds']} "
        "folds per λ (k-fold over train + val).",
        "",
        "## Validation accuracy against λ (mean ± standard error)",
        "",
        "| task | " + " | ".join(f"λ={lam:g}" for lam in GRID) + " | best − λ=0 |",
        "|---|" + "---|" * (len(GRID) + 1),
    ]
    for name, c in results["curves"].items():
        cells = [f"{r['val_accuracy']:.3f} ± {r['se']:.3f}" for r in c["rows"]]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {c['gap']:+.3f} ({c['gap_in_se']:.1f} SE) |"
        )
    t = results["tuner"]
    lines += [
        "",
        NOTE,
        "",
        f"## The hypergradient tuner on {results['tuner_task']}",
        "",
        "The tuner steps `log λ` on the (clean) validation split, looking back one update "
        "(T1–T2, `Tuner(horizon=1)`) or the whole run (forward mode, `horizon=inf`). Final "
        "λ and test accuracy over seeds (mean ± SE), wall time of one tuned run over one "
        "plain run (each `fit` compiled before timing)"
        + (f"; re-measured {t['measured']}" if "measured" in t else "")
        + ".",
        "",
        "| tuner | final λ (per seed) | test accuracy | time / plain run |",
        "|---|---|---|---|",
    ]
    plain = np.median(t["grid_best"]["seconds"])
    for start, r in t["starts"].items():
        m, se = _mean_se(r["test_accuracy"])
        lams = ", ".join(f"{x:.2g}" for x in r["lambda"])
        lines.append(f"| {start} | {lams} | {m:.3f} ± {se:.3f} | "
                     f"{np.median(r['seconds']) / plain:.2f} |")  # fmt: skip
    m, se = _mean_se(t["grid_best"]["test_accuracy"])
    lines.append(
        f"| none: cross-validated best λ = {t['grid_best']['lambda']:g}, fixed | – | "
        f"{m:.3f} ± {se:.3f} | 1 |"
    )
    lines += [
        "",
        "Fixed λ trained on the same split the tuner sees (its own grid): final validation "
        "loss and accuracy on the clean validation split, and test accuracy.",
        "",
        "| λ | val loss | val accuracy | test accuracy |",
        "|---|---|---|---|",
    ]
    for lam, r in t["split_grid"].items():
        cells = [_mean_se(r[k]) for k in ("val_loss", "val_accuracy", "test_accuracy")]
        lines.append(f"| {lam} | " + " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in cells) + " |")
    by_loss = min(t["split_grid"], key=lambda k: np.mean(t["split_grid"][k]["val_loss"]))
    lines += [
        "",
        f"Best λ on this split by validation loss (the tuner's objective): {by_loss}.",
        "",
        "Control, hypergradient on training data from λ₀ = 0.1: final λ "
        + "; ".join(
            f"{mode}: " + ", ".join(f"{x:.2g}" for x in lams)
            for mode, lams in t["control_on_training_data"].items()
        )
        + ".",
    ]
    c = results["cpr"]
    lines += [
        "",
        f"## Constrained parameter regularization on {results['tuner_task']}",
        "",
        "Test accuracy (mean ± SE over the same seeds) of AdamW at each λ, and of Adam + "
        "`wdjax.cpr()` untuned (κ at the inflection point) at each `reg_step_size`, its "
        "one knob; the spread is max − min of the means.",
        "",
        "| optimizer | setting | test accuracy |",
        "|---|---|---|",
    ]
    for name, key in (("AdamW", "λ"), ("Adam + CPR", "reg_step_size")):
        runs = c["adamw" if name == "AdamW" else "cpr"]
        for setting, accs in runs.items():
            m, se = _mean_se(accs)
            lines.append(f"| {name} | {key} = {setting} | {m:.3f} ± {se:.3f} |")
        means = [np.mean(v) for v in runs.values()]
        lines.append(f"| {name} | spread | {max(means) - min(means):.3f} |")
    o = results["optuna"]
    lines += ["", "## The same budget: Optuna (TPE over log λ) or one sweep", ""]
    if "skipped" in o:
        lines.append(f"Skipped: {o['skipped']}.")
    else:
        reach = o["optuna_seconds_to_within_half_pp"]
        lines += [
            f"{o['trials']} values of λ in [1e-4, 0.1], scored on the (clean) validation "
            "split after the full run; wall time includes each `fit`'s compilation, as a "
            "user pays it.",
            "",
            "| method | best val accuracy | at λ | seconds |",
            "|---|---|---|---|",
            f"| `wdjax.sweep`, log grid | {o['sweep_best']:.3f} | {o['sweep_best_lambda']:.2g} "
            f"| {o['sweep_seconds']:.1f} (all {o['trials']}) |",
            f"| Optuna TPE, one `fit` per trial | {o['optuna_best']:.3f} | "
            f"{o['optuna_best_lambda']:.2g} | {o['optuna_trace'][-1][0]:.1f} (all "
            f"{o['trials']}); within 0.5 pp of the best after "
            + ("never" if reach is None else f"{reach:.1f}")
            + " |",
        ]
    f = results["factorial"]
    lines += [
        "",
        "## λ as a timescale: a factorial",
        "",
        "Noisy digits (30% of the labels), data fraction × batch × width × epochs; in each "
        "cell a sweep (validation accuracy, "
        f"{len(results['seeds'])} seeds) finds λ*, and τ*_epoch = 1/(λ*·steps per epoch). "
        "The smallest cell's λ* is moved to the others by a constant τ_epoch "
        "(`wdjax.timescale.transfer`) and compared with reusing it.",
        "",
        "| fraction | batch | width | epochs | λ* | τ*_epoch | best | transferred λ: acc | "
        "reused λ: acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in f["cells"]:
        moved = (
            f"{c['transferred_lambda']:.2g}: {c['transferred_accuracy']:.3f}"
            if "transferred_lambda" in c
            else "(source)"
        )
        reused = f"{c['reused_accuracy']:.3f}" if "reused_accuracy" in c else "–"
        lines.append(
            f"| {c['fraction']:g} | {c['batch']} | {c['width']} | {c['epochs']} | "
            f"{c['lambda']:.2g} | {c['tau_epoch']:.2g} | {c['best_accuracy']:.3f} | {moved} | "
            f"{reused} |"
        )
    others = [c for c in f["cells"] if "transferred_lambda" in c]
    near = sum(c["best_accuracy"] - c["transferred_accuracy"] <= 0.005 for c in others)
    beats = sum(c["transferred_accuracy"] > c["reused_accuracy"] for c in others)
    lines += [
        "",
        f"Spread (std of log10) across cells: λ* {f['spread_log10_lambda']:.2f}, τ*_epoch "
        f"{f['spread_log10_tau_epoch']:.2f}. The transferred λ came within 0.5 pp of the "
        f"cell's best in {near} of {len(others)} cells and beat reusing the source λ in "
        f"{beats} of {len(others)}.",
    ]
    return "\n".join(lines) + "\n"


def _stored() -> tuple[str, dict]:
    root = os.path.dirname(HERE)
    page = open(os.path.join(root, "docs", "lambda_tasks.md")).read()
    json_path = page.split("JSON: `", 1)[1].split("`", 1)[0]
    with open(os.path.join(root, json_path)) as f:
        return os.path.join(root, json_path), json.load(f)


def _write(results: dict, json_path: str) -> None:
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(os.path.dirname(HERE), "docs", "lambda_tasks.md"), "w") as f:
        f.write(render(results))


def _update_tuner() -> dict:
    """The tuner section again, on the stored run's settings; the rest as stored."""
    json_path, results = _stored()
    task = results["tuner_task"]
    ds = tasks(data.load("digits"))[task]
    seeds = (0, 1, 2, 3, 4)
    best = results["curves"][task]["best"]
    results["tuner"] = tuner_runs(ds, results["epochs"], seeds, best)
    env = environment()
    results["tuner"]["measured"] = (
        f"by `python benchmarks/lambda_tasks.py --only-tuner` on {env['cpu']}, {env['date']}"
    )
    _write(results, json_path)
    print(render(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--only-tuner",
        action="store_true",
        help="re-measure the tuner section into the stored JSON, keep the rest",
    )
    args = p.parse_args(argv)
    if args.only_tuner:
        return _update_tuner()
    epochs, seeds, folds = (3, (0, 1), 2) if args.quick else (60, (0, 1), 3)
    base = data.load("digits")
    all_tasks = tasks(base)
    curves = {}
    for name, ds in all_tasks.items():
        t0 = time.perf_counter()
        curves[name] = curve(ds, epochs, seeds, folds)
        print(f"{name}: best λ {curves[name]['best']:g}, gap {curves[name]['gap']:+.3f} "
              f"({curves[name]['gap_in_se']:.1f} SE), {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
    task = "digits+noise0.3"
    tuner_seeds = (0, 1) if args.quick else (0, 1, 2, 3, 4)
    tuned = tuner_runs(all_tasks[task], epochs, tuner_seeds, curves[task]["best"])
    knobs = (50, 200) if args.quick else (50, 100, 200, 400)
    constrained = cpr_runs(all_tasks[task], epochs, tuner_seeds, knobs)
    baseline = optuna_vs_sweep(variants.label_noise(base, 0.3, 0), epochs, 4 if args.quick else 12)
    factors = dict(FACTORS)
    if args.quick:
        factors = {"fraction": (0.5,), "batch": (32, 128), "width": (64,), "epochs": (2,)}
    factorial = timescale_factorial(base, seeds, factors)
    command = "python benchmarks/lambda_tasks.py" + (" --quick" if args.quick else "")
    env = environment()
    json_path = f"benchmarks/results/{env['device_slug']}-{env['date']}-lambda-tasks.json"
    results = {
        "command": command, "environment": env, "epochs": epochs, "seeds": list(seeds),
        "folds": folds, "curves": curves, "tuner_task": task, "tuner": tuned, "cpr": constrained,
        "optuna": baseline, "factorial": factorial,
        "json": json_path,
    }  # fmt: skip
    text = render(results)
    print(text)
    if not args.quick:
        _write(results, os.path.join(os.path.dirname(HERE), json_path))
    return results


if __name__ == "__main__":
    main()
