"""Hyperparameter sweeps as one program: ``jax.vmap`` over λ, learning rate, L1 rate, seed and fold.

Every *member* of a sweep is one training run ``(λ, η, α, seed, fold)``. The optimizer is
built once; ``learning_rate``, ``weight_decay`` and ``l1`` are per-member float32 values in
the vmapped optimizer state (``optax.inject_hyperparams``), so K members train as one
compiled ``lax.scan`` per epoch — each member exactly the run :func:`wdjax.train.fit` does
with the same seed and hyperparameters (to float32 rounding: see ``tests/test_sweep.py``).

k-fold cross-validation pools train + val, deals the rows into ``folds`` seeded (stratified)
folds of equal size ``⌊n/k⌋`` (dropping ``n mod k`` rows) and trains fold ``f`` on the
other folds' row indices — one copy of the data, folds vmapped like any other axis.
Each *setting* ``(λ, η, α)`` is summarized over its seeds × folds by the mean, the sample
standard deviation ``s`` and the standard error ``s/√n`` of the final validation metric.

A 2-D (λ × η) grid, 5-fold cross-validated, is one call (60 members, one program)::

    import wdjax.sweep

    result = wdjax.sweep.sweep(
        "digits", model="mlp", model_config={"widths": (64,)}, optimizer="adamw",
        weight_decay=[0.0, 1e-4, 1e-3, 1e-2], learning_rate=[3e-4, 1e-3, 3e-3],
        folds=5, epochs=20, select="one_se",
    )
    print(result.table())          # every setting, mean ± std over the folds, chosen one starred
    result.to_json("sweep.json")
    result.plot("sweep.png")       # a λ × η heatmap of the mean validation accuracy
    best = result.chosen           # {"weight_decay": ..., "learning_rate": ..., ...}

When K members do not fit in memory they run in chunks of ``chunk_size`` members (the last
chunk padded by repeating its last member, so one program serves every chunk); the
results do not depend on the chunking.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import data as data_lib
from wdjax import models, optimizers
from wdjax._checks import check_rate
from wdjax.train import (
    Metrics,
    TrainState,
    _progress,
    chunks,
    init_state,
    make_train_step,
    run_steps,
)

HYPERPARAMS = ("weight_decay", "learning_rate", "l1")
CPU_MEMORY_BUDGET = 4 << 30  # bytes for a sweep's members where the device reports no limit
DEVICE_MEMORY_FRACTION = 0.5  # of the free device memory, where it reports a limit
Select = Literal["best", "one_se"]
Metric = Literal["accuracy", "loss"]


def kfold_rows(
    y: np.ndarray, folds: int, seed: int = 0, stratified: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, held_out)`` of shapes ``(folds, (folds−1)·m)`` and ``(folds, m)``,
    ``m = ⌊n/folds⌋``: a seeded permutation (sorted by class when ``stratified``, so each
    fold gets every class in proportion to within one row) dealt round-robin into folds;
    the ``n mod folds`` rows that do not fill a fold are left out of both."""
    if not 2 <= folds <= len(y):
        raise ValueError(f"folds must be in [2, {len(y)}], got {folds}")
    order = np.random.default_rng(seed).permutation(len(y))
    if stratified:
        order = order[np.argsort(y[order], kind="stable")]
    m = len(y) // folds
    held = np.stack([order[f::folds][:m] for f in range(folds)]).astype(np.int32)
    train = np.stack([np.concatenate(np.delete(held, f, axis=0)) for f in range(folds)])
    return train, held


def member_bytes(
    model: models.Model, optimizer: optax.GradientTransformation, batch_size: int
) -> int:
    """Bytes one member needs: its :class:`TrainState` plus every intermediate value of one
    train step on a batch (the sum over the step's jaxpr, an upper bound on its live
    activations; evaluation uses batches of the same size and no backward pass)."""
    state = jax.eval_shape(lambda key: init_state(model, optimizer, key), jax.random.PRNGKey(0))
    batch = {
        "x": jax.ShapeDtypeStruct((batch_size, *model.input_shape), jnp.float32),
        "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    jaxpr = jax.make_jaxpr(make_train_step(model, optimizer))(state, batch).jaxpr
    return _nbytes(state) + _intermediate_bytes(jaxpr)


def _nbytes(tree: Any) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _intermediate_bytes(jaxpr: jex.Jaxpr) -> int:
    own = sum(_nbytes([v.aval for v in eqn.outvars]) for eqn in jaxpr.eqns)
    return own + sum(_intermediate_bytes(sub) for sub in jex.subjaxprs(jaxpr))


def memory_budget() -> int:
    """Bytes available to a sweep: ``DEVICE_MEMORY_FRACTION`` of the free memory of
    ``jax.devices()[0]`` where it reports ``memory_stats()``, else ``CPU_MEMORY_BUDGET``."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return CPU_MEMORY_BUDGET
    return int(DEVICE_MEMORY_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


def _evaluate(
    model: models.Model,
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    rows: jax.Array | None,
    batch_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over ``x[rows]`` (all of ``x`` if ``rows`` is None), in
    eval mode, as a scan over batches (the last one padded and masked out)."""
    rows = jnp.arange(x.shape[0]) if rows is None else rows
    n = rows.shape[0]
    padded = -(-n // batch_size) * batch_size
    idx = jnp.pad(rows, (0, padded - n)).reshape(-1, batch_size)
    valid = (jnp.arange(padded) < n).reshape(-1, batch_size)

    def body(total: jax.Array, batch: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        i, ok = batch
        logits, _ = model.apply(state.params, state.model_state, x[i], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[i])
        hits = jnp.argmax(logits, -1) == y[i]
        return total + jnp.stack([jnp.sum(jnp.where(ok, loss, 0.0)), jnp.sum(ok & hits)]), None

    total, _ = jax.lax.scan(body, jnp.zeros(2, jnp.float32), (idx, valid))
    return total[0] / n, total[1] / n


@dataclasses.dataclass
class SweepResult:
    """What :func:`sweep` found.

    ``settings``: one dict per ``(λ, η, α)`` with ``n`` runs (seeds × folds) and ``<metric>_mean``,
    ``_std``, ``_se`` of the final ``accuracy``/``loss`` (training, last epoch's mean),
    ``val_accuracy``/``val_loss``, ``weight_norm`` and ``zero_fraction``. ``members``: one
    dict per run (setting index, hyperparameters, seed, fold, final metrics). ``history``:
    per-epoch metrics, arrays ``(members, epochs)``. ``params``/``model_state``: final
    weights, stacked over members. ``chosen``: index into ``settings``."""

    settings: list[dict[str, Any]]
    members: list[dict[str, Any]]
    history: dict[str, np.ndarray]
    params: Any
    model_state: Any
    chosen_index: int
    config: dict[str, Any]

    @property
    def chosen(self) -> dict[str, Any]:
        return self.settings[self.chosen_index]

    def table(self) -> str:
        """Every setting, mean ± std over its runs; the chosen one starred."""
        head = [
            "",
            "weight_decay",
            "learning_rate",
            "l1",
            "n",
            "train_acc",
            "val_acc",
            "val_loss",
            "weight_norm",
            "zeros",
        ]
        rows = [
            [
                "*" if i == self.chosen_index else "",
                *(f"{s[h]:.3g}" if s[h] is not None else "-" for h in HYPERPARAMS),
                str(s["n"]),
                *(
                    f"{s[k + '_mean']:.4f}±{s[k + '_std']:.4f}"
                    for k in ("accuracy", "val_accuracy", "val_loss")
                ),
                f"{s['weight_norm_mean']:.3g}",
                f"{s['zero_fraction_mean']:.3f}",
            ]
            for i, s in enumerate(self.settings)
        ]
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [head, *rows]]
        c = self.config
        rule = "largest λ within one SE of the best" if c["select"] == "one_se" else "best"
        how = f"{rule} mean val_{c['metric']} over {c['runs_per_setting']} run(s)"
        picked = ", ".join(
            f"{h}={self.chosen[h]:.3g}" for h in HYPERPARAMS if self.chosen[h] is not None
        )
        return "\n".join([*lines, f"chosen ({how}): {picked}"])

    def to_json(self, path: str | os.PathLike) -> None:
        """Write config, settings, chosen setting, members and history (NaN/inf as null)."""
        doc = {
            "config": self.config,
            "chosen": self.chosen,
            "settings": self.settings,
            "members": self.members,
            "history": {k: v.tolist() for k, v in self.history.items()},
        }
        with open(path, "w") as f:
            json.dump(_finite(doc), f, indent=1)

    def plot(self, path: str | os.PathLike) -> None:
        """Save a PNG of the mean validation accuracy (error bars: ± std over runs) against λ,
        one line per (η, α). λ = 0 is drawn on a symlog x axis, linear below the smallest
        nonzero λ. A grid with several λ and several η (at the chosen α) is a heatmap."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        wds = sorted({s["weight_decay"] for s in self.settings})
        lrs = sorted({s["learning_rate"] for s in self.settings})
        if len(wds) > 1 and len(lrs) > 1:
            grid = np.full((len(lrs), len(wds)), np.nan)
            for s in self.settings:
                if s["l1"] == self.chosen["l1"]:
                    grid[lrs.index(s["learning_rate"]), wds.index(s["weight_decay"])] = s[
                        "val_accuracy_mean"
                    ]
            image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(wds)), [f"{w:.3g}" for w in wds])
            ax.set_yticks(range(len(lrs)), [f"{r:.3g}" for r in lrs])
            for (r, w), value in np.ndenumerate(grid):
                ax.text(w, r, f"{value:.3f}", ha="center", va="center", color="w", fontsize=8)
            chosen = (
                wds.index(self.chosen["weight_decay"]),
                lrs.index(self.chosen["learning_rate"]),
            )
            ax.plot(*chosen, "r*", markersize=14)
            ax.set(xlabel="weight decay λ", ylabel="learning rate η")
            fig.colorbar(image, label="mean validation accuracy")
        else:
            for key, group in itertools.groupby(
                sorted(
                    self.settings,
                    key=lambda s: (s["learning_rate"], s["l1"] or 0.0, s["weight_decay"]),
                ),
                key=lambda s: (s["learning_rate"], s["l1"]),
            ):
                group = list(group)
                ax.errorbar(
                    [s["weight_decay"] for s in group],
                    [s["val_accuracy_mean"] for s in group],
                    yerr=[s["val_accuracy_std"] for s in group],
                    marker="o",
                    capsize=3,
                    label=f"η={key[0]:.3g}" + (f", l1={key[1]:.3g}" if key[1] is not None else ""),
                )
            ax.plot(
                self.chosen["weight_decay"],
                self.chosen["val_accuracy_mean"],
                "r*",
                markersize=14,
                label="chosen",
            )
            positive = [w for w in wds if w > 0]
            if positive:
                ax.set_xscale("symlog", linthresh=min(positive))
            ax.set(xlabel="weight decay λ", ylabel="validation accuracy")
            ax.legend()
        fig.savefig(path, dpi=120)


def _finite(obj: Any) -> Any:
    """JSON-ready copy: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj.item() if isinstance(obj, np.generic) else obj


def select_setting(
    mean: np.ndarray,
    se: np.ndarray,
    weight_decay: np.ndarray,
    group: np.ndarray,
    metric: Metric,
    select: Select,
) -> int:
    """The chosen setting: the best mean validation ``metric`` (``select="best"``), or the
    largest λ — the most regularized — whose mean is within one standard error of the best
    one's, among settings that share its other hyperparameters ``group`` (``"one_se"``)."""
    score = mean if metric == "accuracy" else -mean
    score = np.where(np.isnan(score), -np.inf, score)
    best = int(np.argmax(score))
    if select == "best":
        return best
    near = np.flatnonzero((score >= score[best] - se[best]) & (group == group[best]))
    return int(max(near, key=lambda i: (weight_decay[i], score[i])))


@dataclasses.dataclass(frozen=True)
class _Data:
    """Device arrays to train on (``rows``: per-fold row indices, None = all) and to validate on."""

    x: jax.Array
    y: jax.Array
    rows: np.ndarray | None
    x_eval: jax.Array
    y_eval: jax.Array
    held: np.ndarray | None

    @classmethod
    def of(cls, ds: data_lib.Dataset, folds: int | None, seed: int, stratified: bool) -> _Data:
        if not folds:
            return cls(
                *map(jnp.asarray, (ds.x_train, ds.y_train)),
                None,
                *map(jnp.asarray, (ds.x_val, ds.y_val)),
                None,
            )
        x, y = np.concatenate([ds.x_train, ds.x_val]), np.concatenate([ds.y_train, ds.y_val])
        rows, held = kfold_rows(y, folds, seed, stratified)
        x, y = jnp.asarray(x), jnp.asarray(y)
        return cls(x, y, rows, x, y, held)

    @property
    def n_train(self) -> int:
        return self.x.shape[0] if self.rows is None else self.rows.shape[1]


def _train(
    model: models.Model,
    opt: optax.GradientTransformation,
    d: _Data,
    hyper: dict[str, np.ndarray],
    seeds: np.ndarray,
    folds: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    chunk_size: int,
    progress: bool,
) -> tuple[dict[str, np.ndarray], Any, Any]:
    """Train members ``(hyper[h][i], seeds[i], folds[i])`` in chunks; per-epoch metrics
    ``(members, epochs)`` and the final params and model_state stacked over members."""
    step = make_train_step(model, opt)
    steps_per_epoch = d.n_train // batch_size

    inits = {
        seed: init_state(model, opt, jax.random.PRNGKey(seed)) for seed in np.unique(seeds).tolist()
    }

    def init(members: np.ndarray) -> TrainState:
        """Stacked states of ``members``: ``fit``'s init of their seeds, then their hyperparams."""
        state = jax.tree.map(lambda *a: jnp.stack(a), *(inits[s] for s in seeds[members].tolist()))
        hyper_of = {h: jnp.asarray(v[members]) for h, v in hyper.items()}
        return state._replace(opt_state=optax.tree_utils.tree_set(state.opt_state, **hyper_of))

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
    def run_epoch(
        state: TrainState, rows: jax.Array | None, held: jax.Array | None, length: int
    ) -> tuple[TrainState, Metrics]:
        state, m = jax.vmap(lambda s, r: run_steps(step, s, d.x, d.y, batch_size, length, r))(
            state, rows
        )
        val = jax.vmap(lambda s, r: _evaluate(model, s, d.x_eval, d.y_eval, r, batch_size))(
            state, held
        )
        last = {k: m[k][:, -1] for k in ("weight_norm", "zero_fraction", "skipped")}
        return state, {
            "loss": m["loss"].mean(1),
            "accuracy": m["accuracy"].mean(1),
            **last,
            "val_loss": val[0],
            "val_accuracy": val[1],
        }

    n = len(seeds)
    n_chunks = -(-n // chunk_size)
    bar = _progress(progress, n_chunks * epochs, initial=0)
    history, finals = [], []
    for c in range(n_chunks):
        # the last chunk repeats its last member up to chunk_size: one program for all chunks
        members = np.minimum(np.arange(c * chunk_size, (c + 1) * chunk_size), n - 1)
        real = min(chunk_size, n - c * chunk_size)
        state = init(members)
        rows, held = (
            None if r is None else jnp.asarray(r[folds[members]]) for r in (d.rows, d.held)
        )
        epochs_done = []
        for length in chunks(0, epochs * steps_per_epoch, steps_per_epoch, None):
            state, record = run_epoch(state, rows, held, length)
            epochs_done.append({k: v[:real] for k, v in jax.device_get(record).items()})
            bar.update(1)
            bar.set_postfix(
                chunk=f"{c + 1}/{n_chunks}", val_acc=f"{epochs_done[-1]['val_accuracy'].mean():.3f}"
            )
        history.append({k: np.stack([e[k] for e in epochs_done], axis=1) for k in epochs_done[0]})
        finals.append(
            jax.tree.map(lambda a: np.asarray(a[:real]), (state.params, state.model_state))
        )
    bar.close()
    params, model_state = jax.tree.map(lambda *a: np.concatenate(a), *finals)
    return {k: np.concatenate([h[k] for h in history]) for k in history[0]}, params, model_state


def _stats(values: np.ndarray) -> dict[str, float]:
    """Mean, sample standard deviation ``s`` (0 for one run) and standard error ``s/√n``."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "se": std / math.sqrt(len(values))}


def sweep(
    data: data_lib.Dataset | str = "digits",
    *,
    model: models.Model | str = "mlp",
    model_config: Mapping[str, Any] | None = None,
    optimizer: str = "adamw",
    optimizer_config: Mapping[str, Any] | None = None,
    weight_decay: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    learning_rate: Sequence[float] = (1e-3,),
    l1: Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    folds: int | None = None,
    fold_seed: int = 0,
    stratified: bool = True,
    epochs: int = 10,
    batch_size: int = 128,
    select: Select = "best",
    metric: Metric = "accuracy",
    chunk_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train every member of ``weight_decay × learning_rate × l1 × seeds (× folds)`` together.

    ``data``: a Dataset or a name for :func:`wdjax.data.load`. ``model``: a Model or a name for
    :func:`wdjax.models.create` with ``model_config``. ``optimizer``: a name in
    :data:`wdjax.optimizers.OPTIMIZERS`, built with ``optimizer_config``. ``l1=None`` leaves
    the L1 proximal step out of the optimizer. Without ``folds`` members train on
    ``x_train`` and are validated on ``x_val``; with ``folds``, see :func:`kfold_rows`.
    ``select``/``metric``: see :func:`select_setting`. ``chunk_size``: members trained at
    once (default: as many as :func:`member_bytes` and :func:`memory_budget` allow)."""
    if select not in ("best", "one_se") or metric not in ("accuracy", "loss"):
        raise ValueError(
            f"select must be 'best' or 'one_se' and metric 'accuracy' or 'loss', got {select!r}, {metric!r}"
        )
    ds = data_lib.load(data) if isinstance(data, str) else data
    if isinstance(model, str):
        model = models.create(
            model, input_shape=ds.input_shape, num_classes=ds.num_classes, **(model_config or {})
        )
    grid = {
        "weight_decay": list(weight_decay),
        "learning_rate": list(learning_rate),
        "l1": [None] if l1 is None else list(l1),
    }
    for name, values in grid.items():
        if not values:
            raise ValueError(f"{name} needs at least one value")
        for v in values:
            if v is not None:
                check_rate(v, name)
    opt = optimizers.create(
        optimizer,
        grid["learning_rate"][0],
        grid["weight_decay"][0],
        l1=grid["l1"][0],
        **(optimizer_config or {}),
    )
    settings = list(
        itertools.product(*grid.values())
    )  # λ outermost: setting s has λ index s // group_size
    runs = list(itertools.product(range(len(settings)), seeds, range(folds or 1)))
    setting_of, seed_of, fold_of = (np.array(v) for v in zip(*runs))
    hyper = {
        h: np.array([settings[s][i] for s in setting_of], np.float32)
        for i, h in enumerate(HYPERPARAMS)
        if grid[h][0] is not None
    }

    d = _Data.of(ds, folds, fold_seed, stratified)
    batch_size = min(batch_size, d.n_train)
    if chunk_size is None:
        chunk_size = memory_budget() // member_bytes(model, opt, batch_size)
    chunk_size = max(1, min(chunk_size, len(runs)))
    history, params, model_state = _train(
        model,
        opt,
        d,
        hyper,
        seed_of.astype(np.int32),
        fold_of,
        epochs=epochs,
        batch_size=batch_size,
        chunk_size=chunk_size,
        progress=progress,
    )

    final = {k: v[:, -1] for k, v in history.items()}
    members = [
        {
            "setting": int(s),
            **dict(zip(HYPERPARAMS, settings[s])),
            "seed": int(seed),
            "fold": int(f) if folds else None,
            **{k: float(v[i]) for k, v in final.items()},
        }
        for i, (s, seed, f) in enumerate(runs)
    ]
    rows = []
    for s, values in enumerate(settings):
        stats = {
            f"{k}_{name}": x
            for k, v in final.items()
            if k != "skipped"
            for name, x in _stats(v[setting_of == s]).items()
        }
        rows.append({**dict(zip(HYPERPARAMS, values)), "n": int(np.sum(setting_of == s)), **stats})
    key = f"val_{metric}"
    group_size = len(settings) // len(
        grid["weight_decay"]
    )  # settings sharing (η, α) are s ≡ g mod group_size
    chosen = select_setting(
        np.array([r[f"{key}_mean"] for r in rows]),
        np.array([r[f"{key}_se"] for r in rows]),
        np.array(grid["weight_decay"])[np.arange(len(settings)) // group_size],
        np.arange(len(settings)) % group_size,
        metric,
        select,
    )
    config = {
        "dataset": ds.name,
        "model": model.name,
        "model_config": dict(model.config),
        "optimizer": optimizer,
        "optimizer_config": dict(optimizer_config or {}),
        **grid,
        "seeds": list(seeds),
        "folds": folds,
        "fold_seed": fold_seed,
        "stratified": stratified,
        "epochs": epochs,
        "batch_size": batch_size,
        "select": select,
        "metric": metric,
        "chunk_size": chunk_size,
        "members": len(runs),
        "runs_per_setting": len(runs) // len(settings),
    }
    return SweepResult(rows, members, history, params, model_state, chosen, config)
