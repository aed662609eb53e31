"""Everything the lab shows a person: progress bars, text tables, JSON and PNG plots,
for training runs ([`plot_history`][wdjax.lab.report.plot_history]) and sweeps
([`sweep_table`][wdjax.lab.report.sweep_table],
[`write_json`][wdjax.lab.report.write_json],
[`plot_sweep`][wdjax.lab.report.plot_sweep]). matplotlib and tqdm are optional
extras, imported only when used."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """A tqdm bar over epochs, or a silent stand-in when disabled or tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are an optional extra
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="epoch", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns, two spaces apart."""
    widths = [max(map(len, column)) for column in zip(head, *rows, strict=True)]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    )


def finite(obj: Any) -> Any:
    """A JSON-ready copy: NumPy values as Python numbers and lists, non-finite floats
    as None."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        obj = obj.tolist()
        return finite(obj) if isinstance(obj, list) else obj if _ok(obj) else None
    return obj if _ok(obj) else None


def _ok(value: Any) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def write_json(doc: Any, path: str | os.PathLike) -> None:
    """Write `doc` as indented JSON, non-finite floats as null."""
    with open(path, "w") as f:
        json.dump(finite(doc), f, indent=1)


def write_jsonl(records: Sequence[dict], path: str | os.PathLike) -> None:
    """One JSON object a line (non-finite floats as null)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(finite(r)) + "\n" for r in records)


# ------------------------------------------------------------------ training runs


def plot_history(history: list[dict], path: str | os.PathLike) -> None:
    """Loss, accuracy (when the task has it) and weight-norm curves per epoch, and λ
    when it tuned itself (log scale), as a PNG."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    panels = [
        ("loss", (("loss", "train"), ("val_loss", "val"))),
        ("accuracy", (("accuracy", "train"), ("val_accuracy", "val"))),
        ("weight norm", (("weight_norm_decayed", "decayed"), ("weight_norm_other", "other"))),
    ]
    panels = [(t, s) for t, s in panels if history and any(k in history[0] for k, _ in s)]
    if history and "hypergradient" in history[0]:  # a tuned λ: show its course
        panels.append(("λ (tuned)", (("weight_decay", "λ"),)))
    width = 4.4 * len(panels)  # fixed margins: a layout engine draws twice (0.1 s a figure)
    fig = Figure(figsize=(width, 3.6))
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.2 / width, bottom=0.14, top=0.91, wspace=0.25)
    for ax, (title, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key, label in series:
            if key in history[0]:
                ax.plot(epochs, [r[key] for r in history], label=label)
        ax.set(title=title, xlabel="epoch")
        if title.startswith("λ"):
            ax.set_yscale("log")
        ax.legend()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------ sweeps


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def sweep_table(result: Any) -> str:
    """Every setting of a [`wdjax.lab.sweeps.SweepResult`][], mean ± std over its
    runs, the chosen one starred; then the rule and the choice."""
    names = list(result.config["grid"])
    s0 = result.settings[0]
    keys = [k for k in ("loss", "accuracy") if f"{k}_mean" in s0]
    keys += sorted(k[: -len("_mean")] for k in s0 if k.startswith("val_") and k.endswith("_mean"))
    extra = [k for k in ("weight_norm", "zero_fraction") if f"{k}_mean" in s0]
    head = ["", *names, "n", *(k if k.startswith("val_") else f"train_{k}" for k in keys), *extra]
    rows = [
        [
            "*" if i == result.chosen_index else "",
            *(_num(s[h]) for h in names),
            str(s["n"]),
            *(f"{s[f'{k}_mean']:.4f}±{s[f'{k}_std']:.4f}" for k in keys),
            *(f"{s[f'{k}_mean']:.4g}" for k in extra),
        ]
        for i, s in enumerate(result.settings)
    ]
    c = result.config
    rule = "largest λ within one SE of the best" if c["select"] == "one_se" else "best"
    picked = ", ".join(f"{h}={_num(result.chosen[h])}" for h in names)
    choice = (
        f"chosen ({rule} mean val_{c['metric']}, {c['runs_per_setting']} run(s) each): {picked}"
    )
    return text_table(head, rows) + "\n" + choice


def plot_sweep(result: Any, path: str | os.PathLike) -> Any:
    """Save (and return) a matplotlib Figure as PNG: the mean validation metric against
    λ with ± std error bars, one line per setting of the other hyperparameters, the
    chosen setting starred. λ = 0 sits on a **symlog** x axis, linear below the
    smallest nonzero λ. A grid of several λ and several η is drawn as a λ × η heatmap
    (at the chosen values of the rest)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    grid = result.config["grid"]
    if len(grid.get("weight_decay", ())) > 1 and len(grid.get("learning_rate", ())) > 1:
        _heatmap(result, fig, ax)
    else:
        _curves(result, ax)
    fig.savefig(path, dpi=120)
    return fig


def _heatmap(result: Any, fig: Any, ax: Any) -> None:
    key = f"val_{result.config['metric']}_mean"
    wds, lrs = result.config["grid"]["weight_decay"], result.config["grid"]["learning_rate"]
    chosen = result.chosen
    rest = {
        h: chosen[h] for h in result.config["grid"] if h not in ("weight_decay", "learning_rate")
    }
    values = np.full((len(lrs), len(wds)), np.nan)
    for s in result.settings:
        if all(s[k] == v for k, v in rest.items()):
            values[lrs.index(s["learning_rate"]), wds.index(s["weight_decay"])] = s[key]
    image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis")
    for (r, w), value in np.ndenumerate(values):
        ax.text(w, r, f"{value:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.plot(
        wds.index(chosen["weight_decay"]), lrs.index(chosen["learning_rate"]), "r*", markersize=14
    )
    ax.set_xticks(range(len(wds)), [f"{w:.3g}" for w in wds])
    ax.set_yticks(range(len(lrs)), [f"{r:.3g}" for r in lrs])
    ax.set(xlabel="weight decay λ", ylabel="learning rate η")
    if rest:
        ax.set_title(", ".join(f"{k} = {_num(v)}" for k, v in rest.items()))
    fig.colorbar(image, label=f"mean val_{result.config['metric']}")


def _curves(result: Any, ax: Any) -> None:
    metric = f"val_{result.config['metric']}"
    x_name = "weight_decay" if "weight_decay" in result.config["grid"] else None
    x_name = x_name or next(iter(result.config["grid"]))

    def others(s: dict) -> tuple:
        return tuple((k, s[k]) for k in result.config["grid"] if k != x_name)

    for line, group in itertools.groupby(sorted(result.settings, key=others), key=others):
        group = sorted(group, key=lambda s: s[x_name])
        ax.errorbar(
            [s[x_name] for s in group],
            [s[f"{metric}_mean"] for s in group],
            yerr=[s[f"{metric}_std"] for s in group],
            marker="o",
            capsize=3,
            label=", ".join(f"{k}={_num(v)}" for k, v in line) or None,
        )
    chosen = result.chosen
    ax.plot(chosen[x_name], chosen[f"{metric}_mean"], "r*", markersize=14, label="chosen")
    xs = [v for v in result.config["grid"][x_name] if v]
    if xs:
        ax.set_xscale("symlog", linthresh=min(xs))
    ax.set(xlabel=x_name, ylabel=metric)
    ax.legend()
