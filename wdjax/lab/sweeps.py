"""Hyperparameter sweeps as one program: ``jax.vmap`` over λ, learning rate, L1 rate, seed, fold.

A *member* is one training run ``(λ, η, α, seed, fold)``. The optimizer is built once;
``weight_decay`` λ, ``learning_rate`` η and ``l1`` α are per-member float32 values in the
vmapped optimizer state (``optax.inject_hyperparams``), so K members train as one compiled
``lax.scan`` per epoch. Each member is the run :func:`wdjax.train.fit` does with the same
seed and hyperparameters — same init, same batches, same updates — up to float32 rounding
(XLA picks fusions and reduction orders by array shape, so a K-wide program can round
differently in the last bits; ``tests/test_sweep.py`` pins the tolerance).

k-fold cross-validation pools train + val, deals the rows into ``folds`` seeded
(stratified) folds of equal size ``m = ⌊n/k⌋`` and trains fold ``f`` on the row indices of
the other folds: one copy of the data, folds vmapped like any other axis. A *setting*
``(λ, η, α)`` is summarized over its ``r`` runs (seeds × folds) by the mean ``x̄``, the
sample standard deviation ``s`` and the standard error ``s/√r`` of each final metric.

A 2-D (λ × η) grid, 5-fold cross-validated — 60 members, one program::

    import wdjax

    result = wdjax.sweep(
        "digits", model="mlp", model_config={"widths": (64,)}, optimizer="adamw",
        weight_decay=[0.0, 1e-3, 1e-2, 1e-1], learning_rate=[3e-4, 1e-3, 3e-3],
        folds=5, epochs=20, select="one_se",
    )
    print(result.table())       # every setting, mean ± std over folds; the chosen one starred
    result.to_json("sweep.json")
    result.plot("sweep.png")    # λ × η heatmap of the mean validation accuracy
    result.chosen               # {"weight_decay": ..., "learning_rate": ..., ...}

When K members do not fit in memory they run in chunks of ``chunk_size`` (the last chunk
padded by repeating its last member, so one compiled program serves every chunk).
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

from wdjax import optimizers
from wdjax.groups import check_rate
from wdjax.lab import data as data_lib
from wdjax.lab import models
from wdjax.lab.train import (
    Metrics,
    TrainState,
    chunks,
    init_state,
    make_train_step,
    progress_bar,
    run_steps,
)

HYPERPARAMS = ("weight_decay", "learning_rate", "l1")
CPU_MEMORY_BUDGET = 4 << 30  # bytes for a sweep's members when the device reports no limit
DEVICE_MEMORY_FRACTION = 0.5  # of the device's free memory, when it reports a limit
Select = Literal["best", "one_se"]
Metric = Literal["accuracy", "loss"]


def kfold_rows(
    y: np.ndarray, folds: int, seed: int = 0, stratified: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, held_out)``, shapes ``(folds, (folds−1)·m)`` and ``(folds, m)``
    with ``m = ⌊n/folds⌋``: a seeded permutation (grouped by class when ``stratified``, so
    every fold gets each class in proportion, to within one row) dealt round-robin into
    folds; the ``n mod folds`` rows left over (at most one per fold) are dropped."""
    if not 2 <= folds <= len(y):
        raise ValueError(f"folds must be in [2, {len(y)}], got {folds}")
    order = np.random.default_rng(seed).permutation(len(y))
    if stratified:
        order = order[np.argsort(y[order], kind="stable")]
    m = len(y) // folds
    held = np.stack([order[f::folds][:m] for f in range(folds)]).astype(np.int32)
    train = np.stack([np.delete(held, f, axis=0).ravel() for f in range(folds)])
    return train, held


@functools.lru_cache(maxsize=16)
def member_bytes(
    model: models.Model, optimizer: optax.GradientTransformation, batch_size: int
) -> int:
    """Bytes one member needs: its :class:`TrainState` plus every intermediate value of one
    train step (summed over the step's jaxpr: an upper bound on its live activations;
    evaluation runs on batches of the same size without a backward pass)."""
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
    """Bytes for a sweep's members: ``DEVICE_MEMORY_FRACTION`` of the free memory of
    ``jax.devices()[0]`` if it reports ``memory_stats()``, else ``CPU_MEMORY_BUDGET``."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return CPU_MEMORY_BUDGET
    return int(DEVICE_MEMORY_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


def select_setting(
    mean: np.ndarray,
    se: np.ndarray,
    weight_decay: np.ndarray,
    group: np.ndarray,
    metric: Metric = "accuracy",
    select: Select = "best",
) -> int:
    """Index of the chosen setting. ``"best"``: the best mean validation ``metric`` (highest
    accuracy or lowest loss; NaN never wins). ``"one_se"``: among the settings of the best
    one's ``group`` (same η and α), the largest λ — the most regularized — whose mean is
    within one standard error of the best: ``score ≥ score_best − se_best``."""
    score = np.where(np.isnan(mean), -np.inf, mean if metric == "accuracy" else -mean)
    best = int(np.argmax(score))
    if select == "best":
        return best
    near = np.flatnonzero((score >= score[best] - se[best]) & (group == group[best]))
    return int(max(near, key=lambda i: (weight_decay[i], score[i])))


def _evaluate(
    model: models.Model,
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    rows: jax.Array | None,
    batch_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of eval-mode ``model`` over ``x[rows]`` (all of ``x``
    if ``rows`` is None): a scan over batches, the last one padded and masked out."""
    rows = jnp.arange(x.shape[0]) if rows is None else rows
    n = rows.shape[0]
    padded = -(-n // batch_size) * batch_size
    idx = jnp.pad(rows, (0, padded - n)).reshape(-1, batch_size)
    valid = (jnp.arange(padded) < n).reshape(-1, batch_size)

    def body(total: jax.Array, batch: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        i, ok = batch
        logits, _ = model.apply(state.params, state.model_state, x[i], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[i])
        hits = ok & (jnp.argmax(logits, -1) == y[i])
        return total + jnp.stack([jnp.sum(jnp.where(ok, loss, 0.0)), jnp.sum(hits)]), None

    total, _ = jax.lax.scan(body, jnp.zeros(2, jnp.float32), (idx, valid))
    return total[0] / n, total[1] / n


@functools.lru_cache(maxsize=4)
def _program(
    model: models.Model,
    optimizer: str,
    config: tuple[tuple[str, Any], ...],
    l1: bool,
    batch_size: int,
) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer (placeholder hyperparameters, overwritten per member) and the jitted
    epoch of a chunk of members; cached, so sweeps of the same structure compile once."""
    opt = optimizers.create(optimizer, 1.0, 0.0, l1=0.0 if l1 else None, **dict(config))
    step = make_train_step(model, opt)

    def epoch(
        state: TrainState,
        x: jax.Array,
        y: jax.Array,
        rows: jax.Array | None,
        x_eval: jax.Array,
        y_eval: jax.Array,
        held: jax.Array | None,
        length: int,
    ) -> tuple[TrainState, Metrics]:
        """``length`` steps of every member, then its epoch metrics and validation."""
        train = jax.vmap(lambda s, r: run_steps(step, s, x, y, batch_size, length, r))
        state, m = train(state, rows)
        val = jax.vmap(lambda s, r: _evaluate(model, s, x_eval, y_eval, r, batch_size))
        val_loss, val_accuracy = val(state, held)
        return state, {
            "loss": m["loss"].mean(1),
            "accuracy": m["accuracy"].mean(1),
            **{k: m[k][:, -1] for k in ("weight_norm", "zero_fraction", "skipped")},
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }

    return opt, jax.jit(epoch, static_argnums=7, donate_argnums=0)


def _compiled(*key: Any) -> tuple[optax.GradientTransformation, Any]:
    try:
        hash(key)
    except TypeError:  # an unhashable optimizer option (say, a dict mask): no caching
        return _program.__wrapped__(*key)
    return _program(*key)


@dataclasses.dataclass(frozen=True)
class _Data:
    """Arrays to train on (``rows``: per-fold row indices; None: all rows) and to validate on
    (``held``: per-fold held-out rows; None: all of ``x_eval``)."""

    x: jax.Array
    y: jax.Array
    rows: np.ndarray | None
    x_eval: jax.Array
    y_eval: jax.Array
    held: np.ndarray | None

    @classmethod
    def of(cls, ds: data_lib.Dataset, folds: int | None, seed: int, stratified: bool) -> _Data:
        if not folds:
            x, y, x_val, y_val = map(jnp.asarray, (ds.x_train, ds.y_train, ds.x_val, ds.y_val))
            return cls(x, y, None, x_val, y_val, None)
        y = np.concatenate([ds.y_train, ds.y_val])
        rows, held = kfold_rows(y, folds, seed, stratified)
        x, y = jnp.asarray(np.concatenate([ds.x_train, ds.x_val])), jnp.asarray(y)
        return cls(x, y, rows, x, y, held)

    @property
    def n_train(self) -> int:
        return self.x.shape[0] if self.rows is None else self.rows.shape[1]

    def member_rows(self, folds: np.ndarray) -> tuple[jax.Array | None, jax.Array | None]:
        """Training and held-out rows of members in ``folds`` (None, None without folds)."""
        return tuple(None if r is None else jnp.asarray(r[folds]) for r in (self.rows, self.held))


def _train(
    model: models.Model,
    opt: optax.GradientTransformation,
    run_epoch: Any,
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
    """Train members ``i = (hyper[h][i], seeds[i], folds[i])`` in chunks; return per-epoch
    metrics ``(members, epochs)`` and the final params and model_state stacked over members."""
    inits = {s: init_state(model, opt, jax.random.PRNGKey(s)) for s in set(seeds.tolist())}
    steps_per_epoch = d.n_train // batch_size
    n = len(seeds)
    n_chunks = -(-n // chunk_size)
    bar = progress_bar(progress, n_chunks * epochs, initial=0)
    history, finals = [], []
    for c in range(n_chunks):
        members = np.minimum(np.arange(c * chunk_size, (c + 1) * chunk_size), n - 1)
        real = min(chunk_size, n - c * chunk_size)
        state = jax.tree.map(lambda *a: jnp.stack(a), *(inits[s] for s in seeds[members].tolist()))
        opt_state = optax.tree_utils.tree_set(
            state.opt_state, **{h: jnp.asarray(v[members]) for h, v in hyper.items()}
        )
        state = state._replace(opt_state=opt_state)
        rows, held = d.member_rows(folds[members])
        records = []
        for length in chunks(0, epochs * steps_per_epoch, steps_per_epoch, None):
            state, record = run_epoch(state, d.x, d.y, rows, d.x_eval, d.y_eval, held, length)
            records.append({k: v[:real] for k, v in jax.device_get(record).items()})
            bar.update(1)
            bar.set_postfix(
                chunk=f"{c + 1}/{n_chunks}", val_acc=f"{records[-1]['val_accuracy'].mean():.3f}"
            )
        history.append({k: np.stack([r[k] for r in records], axis=1) for k in records[0]})
        finals.append(
            jax.tree.map(lambda a, r=real: np.asarray(a[:r]), (state.params, state.model_state))
        )
    bar.close()
    params, model_state = jax.tree.map(lambda *a: np.concatenate(a), *finals)
    return {k: np.concatenate([h[k] for h in history]) for k in history[0]}, params, model_state


def _summarize(final: dict[str, np.ndarray], runs: np.ndarray) -> dict[str, Any]:
    """``n`` runs (selected by the mask ``runs``) and, for each final metric, its mean ``x̄``,
    sample standard deviation ``s`` (0 for one run) and standard error ``s/√n``."""
    n = int(np.sum(runs))
    out: dict[str, Any] = {"n": n}
    for k, v in final.items():
        if k != "skipped":
            std = float(np.std(v[runs], ddof=1)) if n > 1 else 0.0
            out |= {
                f"{k}_mean": float(np.mean(v[runs])),
                f"{k}_std": std,
                f"{k}_se": std / math.sqrt(n),
            }
    return out


@dataclasses.dataclass
class SweepResult:
    """What :func:`sweep` found.

    ``settings``: one dict per ``(λ, η, α)``: the hyperparameters, ``n`` runs (seeds × folds)
    and ``<m>_mean``, ``<m>_std``, ``<m>_se`` of each final metric ``m``: ``accuracy`` and
    ``loss`` (training, mean over the last epoch), ``val_accuracy``, ``val_loss``,
    ``weight_norm`` and ``zero_fraction``. ``members``: one dict per run (setting index,
    hyperparameters, seed, fold, final metrics). ``history``: per-epoch metrics, arrays
    ``(members, epochs)``. ``params``/``model_state``: final weights, stacked over members.
    ``chosen_index``: the chosen setting (see :func:`select_setting`)."""

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
        """Every setting, mean ± std over its runs, the chosen one starred; then the choice."""
        head = ["", *HYPERPARAMS, "n", "train_acc", "val_acc", "val_loss", "weight_norm", "zeros"]
        rows = [
            [
                "*" if i == self.chosen_index else "",
                *("-" if s[h] is None else f"{s[h]:.3g}" for h in HYPERPARAMS),
                str(s["n"]),
                *(
                    f"{s[f'{m}_mean']:.4f}±{s[f'{m}_std']:.4f}"
                    for m in ("accuracy", "val_accuracy", "val_loss")
                ),
                f"{s['weight_norm_mean']:.4g}",
                f"{s['zero_fraction_mean']:.3f}",
            ]
            for i, s in enumerate(self.settings)
        ]
        widths = [max(map(len, column)) for column in zip(head, *rows, strict=True)]
        lines = [
            "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *rows]
        ]
        c = self.config
        rule = "largest λ within one SE of the best" if c["select"] == "one_se" else "best"
        picked = ", ".join(
            f"{h}={self.chosen[h]:.3g}" for h in HYPERPARAMS if self.chosen[h] is not None
        )
        lines.append(
            f"chosen ({rule} mean val_{c['metric']}, {c['runs_per_setting']} run(s) each): {picked}"
        )
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write config, chosen setting, settings, members and history (non-finite as null)."""
        doc = {
            "config": self.config,
            "chosen": self.chosen,
            "settings": self.settings,
            "members": self.members,
            "history": {k: v.tolist() for k, v in self.history.items()},
        }
        with open(path, "w") as f:
            json.dump(_finite(doc), f, indent=1)

    def plot(self, path: str | os.PathLike) -> Any:
        """Save (and return) a matplotlib Figure as PNG: mean validation accuracy against λ
        with ± std error bars, one line per (η, α), the chosen setting starred. λ = 0 sits on
        a **symlog** x axis, linear below the smallest nonzero λ. A grid of several λ and
        several η is drawn as a λ × η heatmap instead (at the chosen α)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        wds = sorted({s["weight_decay"] for s in self.settings})
        lrs = sorted({s["learning_rate"] for s in self.settings})
        if len(wds) > 1 and len(lrs) > 1:
            self._heatmap(fig, ax, wds, lrs)
        else:
            self._curves(ax, wds)
        fig.savefig(path, dpi=120)
        return fig

    def _heatmap(self, fig: Any, ax: Any, wds: list[float], lrs: list[float]) -> None:
        grid = np.full((len(lrs), len(wds)), np.nan)
        for s in self.settings:
            if s["l1"] == self.chosen["l1"]:
                grid[lrs.index(s["learning_rate"]), wds.index(s["weight_decay"])] = s[
                    "val_accuracy_mean"
                ]
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for (r, w), value in np.ndenumerate(grid):
            ax.text(w, r, f"{value:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.plot(
            wds.index(self.chosen["weight_decay"]),
            lrs.index(self.chosen["learning_rate"]),
            "r*",
            markersize=14,
        )
        ax.set_xticks(range(len(wds)), [f"{w:.3g}" for w in wds])
        ax.set_yticks(range(len(lrs)), [f"{r:.3g}" for r in lrs])
        ax.set(xlabel="weight decay λ", ylabel="learning rate η")
        if self.chosen["l1"] is not None:
            ax.set_title(f"l1 α = {self.chosen['l1']:.3g}")
        fig.colorbar(image, label="mean validation accuracy")

    def _curves(self, ax: Any, wds: list[float]) -> None:
        def line(s: dict) -> tuple[float, float]:
            return s["learning_rate"], s["l1"] or 0.0

        for (lr, l1), group in itertools.groupby(sorted(self.settings, key=line), key=line):
            group = sorted(group, key=lambda s: s["weight_decay"])
            ax.errorbar(
                [s["weight_decay"] for s in group],
                [s["val_accuracy_mean"] for s in group],
                yerr=[s["val_accuracy_std"] for s in group],
                marker="o",
                capsize=3,
                label=f"η={lr:.3g}, α={l1:.3g}",
            )
        ax.plot(
            self.chosen["weight_decay"],
            self.chosen["val_accuracy_mean"],
            "r*",
            markersize=14,
            label="chosen",
        )
        if any(w > 0 for w in wds):
            ax.set_xscale("symlog", linthresh=min(w for w in wds if w > 0))
        ax.set(xlabel="weight decay λ", ylabel="validation accuracy")
        ax.legend()


def _finite(obj: Any) -> Any:
    """A JSON-ready copy: NumPy scalars as Python numbers, non-finite floats as None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


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

    ``data``: a Dataset or a name for :func:`wdjax.data.load`. ``model``: a Model, or a name
    for :func:`wdjax.models.create` with ``model_config``. ``optimizer``: a name in
    :data:`wdjax.optimizers.OPTIMIZERS`, built with ``optimizer_config`` (``momentum``,
    ``lr_coupling``, ``mask``, ...). ``l1=None`` leaves the L1 proximal step out. Without
    ``folds`` members train on ``x_train`` and validate on ``x_val``; with ``folds``, see
    :func:`kfold_rows` (split by ``fold_seed``). ``select``, ``metric``: see
    :func:`select_setting`. ``chunk_size``: members trained at once (default: as many as
    fit :func:`memory_budget` at :func:`member_bytes` each)."""
    if select not in ("best", "one_se") or metric not in ("accuracy", "loss"):
        raise ValueError(
            f"need select in ('best', 'one_se') and metric in ('accuracy', 'loss'), got {select!r}, {metric!r}"
        )
    if epochs < 1 or not seeds or (chunk_size is not None and chunk_size < 1):
        raise ValueError(
            f"need epochs >= 1, seeds and chunk_size >= 1, got {epochs}, {seeds}, {chunk_size}"
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

    d = _Data.of(ds, folds, fold_seed, stratified)
    batch_size = min(batch_size, d.n_train)
    options = tuple(sorted((optimizer_config or {}).items()))
    opt, run_epoch = _compiled(model, optimizer, options, l1 is not None, batch_size)
    settings = list(itertools.product(*grid.values()))  # λ outermost
    runs = list(itertools.product(range(len(settings)), seeds, range(folds or 1)))
    setting_of, seed_of, fold_of = (np.array(v) for v in zip(*runs, strict=True))
    hyper = {
        h: np.array([settings[s][i] for s in setting_of], np.float32)
        for i, h in enumerate(HYPERPARAMS)
        if grid[h] != [None]
    }
    if chunk_size is None:
        chunk_size = memory_budget() // member_bytes(model, opt, batch_size)
    chunk_size = max(1, min(chunk_size, len(runs)))
    history, params, model_state = _train(
        model, opt, run_epoch, d, hyper, seed_of.astype(np.int32), fold_of,
        epochs=epochs, batch_size=batch_size, chunk_size=chunk_size, progress=progress,
    )  # fmt: skip

    final = {k: v[:, -1] for k, v in history.items()}
    members = [
        {
            "setting": s,
            **dict(zip(HYPERPARAMS, settings[s], strict=True)),
            "seed": seed,
            "fold": fold if folds else None,
            **{k: float(v[i]) for k, v in final.items()},
        }
        for i, (s, seed, fold) in enumerate(runs)
    ]
    summary = [
        {**dict(zip(HYPERPARAMS, values, strict=True)), **_summarize(final, setting_of == s)}
        for s, values in enumerate(settings)
    ]
    group = len(settings) // len(grid["weight_decay"])  # settings s ≡ g (mod group) share (η, α)
    key = f"val_{metric}"
    chosen = select_setting(
        np.array([r[f"{key}_mean"] for r in summary]),
        np.array([r[f"{key}_se"] for r in summary]),
        np.array([r["weight_decay"] for r in summary]),
        np.arange(len(settings)) % group,
        metric,
        select,
    )
    config = {
        "dataset": ds.name,
        "model": model.name,
        "model_config": dict(model.config),
        "optimizer": optimizer,
        "optimizer_config": {
            k: v if isinstance(v, (bool, int, float, str)) else repr(v) for k, v in options
        },
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
    return SweepResult(summary, members, history, params, model_state, chosen, config)
