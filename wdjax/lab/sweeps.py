"""Hyperparameter sweeps as one program: `jax.vmap` over (λ, η, α, seed, fold), any model.

A *member* is one training run. The optimizer is built once; its injected
hyperparameters (`weight_decay` λ, `learning_rate` η, `l1` α, or any other that
`optax.inject_hyperparams` put in its state) are per-member float32 values in the
vmapped optimizer state, so K members train as one compiled `lax.scan` per epoch.
Each member is the run [`wdjax.lab.train.fit`][] does with the same seed and
hyperparameters (same init, batches and updates) up to float32 rounding: XLA picks
fusions and reduction orders by array shape, so a K-wide program can round differently
in the last bits.

The model is anything [`wdjax.lab.tasks.as_task`][] takes: a reference model by name,
a [`Model`][wdjax.lab.models.Model], or your own [`Task`][wdjax.lab.tasks.Task] built
with [`wdjax.lab.tasks.task`][] from `init(key) -> params` and
`loss(params, batch) -> scalar`:

```python
import jax, jax.numpy as jnp, numpy as np, wdjax
from wdjax.lab import tasks

x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
y = x @ np.linspace(-1, 1, 8).astype(np.float32)
ridge = tasks.task(
    lambda key: {"w": jnp.zeros((8, 1))},
    lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"][:, None]) ** 2),
)
result = wdjax.sweep({"x": x, "y": y}, model=ridge, optimizer=wdjax.sgdw(0.1),
                     weight_decay=[0.0, 1e-2], folds=4, epochs=3, progress=False)
```

k-fold cross-validation pools the training (and validation) rows, deals them into
`folds` seeded folds of equal size (stratified by an integer `"y"`, when there is
one) and trains fold `f` on the row indices of the others: one copy of the data, folds
vmapped like any other axis. When K members do not fit in memory they run in chunks
(the last one padded by repeating its last member, so one compiled program serves
every chunk). A chunk's epochs run unguarded steps; the first epoch in which a member
had a fault (a non-finite loss, gradient or update: a diverging η, say) runs again from
a copy of its start with the guarded step, as do the chunk's later epochs
(see [`wdjax.lab.train.replay_faulty`][]).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from wdjax import masks, optimizers
from wdjax.distributed import Layout
from wdjax.groups import check_rate
from wdjax.hypergradient import Tuner
from wdjax.lab import compiler, models, report, tasks
from wdjax.lab import data as data_lib
from wdjax.lab.folds import kfold_rows
from wdjax.lab.memory import member_bytes, memory_budget, nbytes
from wdjax.lab.selection import SELECTS, Select, select_setting, summarize
from wdjax.lab.tasks import Batch, Task
from wdjax.lab.train import (
    LAST,
    TrainState,
    batch_order,
    chunks,
    init_state,
    make_train_step,
    replay_faulty,
    run_steps,
    weight_metrics,
)
from wdjax.optimizers import set_hyperparams
from wdjax.penalties import Penalty
from wdjax.types import Mask

HYPERPARAMS = ("weight_decay", "learning_rate", "l1")  # of the named optimizers


@dataclasses.dataclass
class SweepResult:
    """What [`sweep`][wdjax.lab.sweeps.sweep] found.

    `settings`: one dict per grid point, carrying its hyperparameters by name, `n`
    runs (seeds × folds) and `<m>_mean`, `<m>_std`, `<m>_se` of each final metric
    `m` (training `loss` and the task's metrics over the last epoch,
    `val_<name>` for each validation metric, `weight_norm`, `zero_fraction`...).
    `members`: one dict per run (setting index, hyperparameters, seed, fold, final
    metrics). `history`: per-epoch metrics, arrays `(members, epochs)`.
    `params`/`model_state`: final weights, stacked over members. `chosen_index`:
    the chosen setting (see [`wdjax.lab.selection.select_setting`][])."""

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
        """Every setting, mean ± std over its runs, the chosen one starred."""
        return report.sweep_table(self)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write config, chosen setting, settings, members and history (non-finite: null)."""
        doc = {"config": self.config, "chosen": self.chosen, "settings": self.settings}
        report.write_json(doc | {"members": self.members, "history": self.history}, path)

    def plot(self, path: str | os.PathLike) -> Any:
        """Save the validation metric against λ (or a λ × η heatmap) as PNG."""
        return report.plot_sweep(self, path)


@functools.lru_cache(maxsize=16)
def _named_optimizer(name: str, options: tuple, lr: float, l1: bool) -> Any:
    """A named optimizer with placeholder hyperparameters (overwritten per member);
    cached, so sweeps of the same structure reuse one optimizer and its programs."""
    return optimizers.create(name, lr, 0.0, l1=0.0 if l1 else None, **dict(options))


def _cached(fn: Callable, *key: Any) -> Any:
    try:
        hash(key)
    except TypeError:  # an unhashable option (a dict mask, say): no caching
        return fn.__wrapped__(*key)
    return fn(*key)


@functools.lru_cache(maxsize=8)
def _program(
    task: Task,
    opt: optax.GradientTransformation,
    batch_size: int,
    penalties: tuple[Penalty, ...],
    mask: Mask,
    layout: Layout | None = None,
    tuner: Tuner | None = None,
    batching: str = "vmap",
    guard: bool = True,
) -> tuple[Callable, Callable]:
    """The train step and the jitted epoch of a chunk of members; cached, so sweeps of
    the same structure compile once. With a layout, members are split over its
    `members` axis (the vmap's `spmd_axis_name`) and each member's batches over its
    data axes; every output stays split by member. `batching="map"`: the chunk's
    members run one after another inside the program (`lax.map`), not batched.
    `guard`: the step's (see [`make_train_step`][wdjax.lab.train.make_train_step])."""
    step = make_train_step(
        task,
        opt,
        penalties=penalties,
        mask=mask,
        layout=layout,
        tuner=tuner,
        weight_metrics_each_step=False,  # once an epoch, below
        update_in_cond=batching == "map",  # vmap turns the skip's cond into a select
        guard=guard,
    )
    spmd = "members" if layout is not None and layout.size("members") > 1 else None

    def epoch(
        state: TrainState,
        train: Batch,
        rows: Any,
        val: Batch,
        held: Any,
        length: int,
        shared: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """`length` steps of every member, then its epoch metrics and validation.
        `shared`: `(rng, first step)` of members that share a seed: one batch order,
        computed once, serves them all (else each member computes its own)."""
        order = None
        if shared is not None:  # each member's batches are then one unbatched array
            n = jax.tree.leaves(train)[0].shape[0] if rows is None else rows.shape[1]
            order = batch_order(*shared, n, batch_size, length)

        def one(s: TrainState, r: Any, h: Any) -> tuple[TrainState, dict]:
            held = None  # a tuner's held-out batches: the member's held-out rows
            if tuner is not None:
                held = val if h is None else jax.tree.map(lambda a: a[h], val)
            return run_steps(step, s, train, batch_size, length, r, held=held, order=order)

        def members(fn: Callable) -> Callable:
            if batching == "vmap":
                return jax.vmap(fn, spmd_axis_name=spmd)
            return lambda *args: jax.lax.map(lambda a: fn(*a), args)

        state, m = members(one)(state, rows, held)
        weights = members(lambda s: weight_metrics(s.params, masks.resolve(s.params, mask)))
        scores = members(
            lambda s, r: tasks.evaluate(task, s.params, s.model_state, val, r, batch_size)
        )(state, held)
        means = {k: v.mean(1) for k, v in m.items() if k not in LAST}
        last = {k: m[k][:, -1] for k in LAST if k in m} | weights(state)
        return state, means | last | {f"val_{k}": v for k, v in scores.items()}

    out = {} if layout is None else {"out_shardings": layout.members()}
    return step, jax.jit(
        epoch, static_argnums=5, donate_argnums=0, compiler_options=compiler.options(), **out
    )


@dataclasses.dataclass(frozen=True)
class _Data:
    """Arrays to train on (`rows`: per-fold row indices; None: all rows) and to
    validate on (`held`: per-fold held-out rows; None: all of `val`)."""

    train: Batch
    rows: np.ndarray | None
    val: Batch
    held: np.ndarray | None

    @classmethod
    def of(cls, data: Any, folds: int | None, seed: int, stratified: bool | None) -> _Data:
        if isinstance(data, data_lib.Dataset):
            data = (data.arrays("train"), data.arrays("val"))
        pair = isinstance(data, (tuple, list)) and len(data) == 2
        if not folds:
            if not pair:
                raise ValueError("without folds, data must be a Dataset or (train, val) arrays")
            train, val = (jax.tree.map(jnp.asarray, d) for d in data)
            return cls(train, None, val, None)
        pool = jax.tree.map(lambda *a: np.concatenate(a), *data) if pair else data
        labels = pool.get("y") if isinstance(pool, Mapping) else None
        labelled = labels is not None and np.ndim(labels) == 1
        labelled = labelled and np.issubdtype(np.asarray(labels).dtype, np.integer)
        if stratified and not labelled:
            raise ValueError("stratified folds need integer labels under the key 'y'")
        n = jax.tree.leaves(pool)[0].shape[0]
        rows, held = kfold_rows(
            labels if labelled else np.arange(n), folds, seed, labelled and stratified is not False
        )
        pool = jax.tree.map(jnp.asarray, pool)
        return cls(pool, rows, pool, held)

    @property
    def n_train(self) -> int:
        n = jax.tree.leaves(self.train)[0].shape[0]
        return n if self.rows is None else self.rows.shape[1]

    def member_rows(self, folds: np.ndarray) -> tuple[jax.Array | None, jax.Array | None]:
        """Training and held-out rows of members in `folds` (None, None without folds)."""
        return tuple(None if r is None else jnp.asarray(r[folds]) for r in (self.rows, self.held))


def _injected(opt_state: Any) -> set[str]:
    """Names of the hyperparameters `optax.inject_hyperparams` put in `opt_state`."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
    return {k for s in found for k in getattr(s, "hyperparams", {})}


def _train(
    task: Task,
    opt: optax.GradientTransformation,
    run_epoch: Callable[[bool], Callable],
    d: _Data,
    hyper: dict[str, np.ndarray],
    seeds: np.ndarray,
    folds: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    chunk_size: int,
    progress: bool,
    layout: Layout | None,
    tuner: Tuner | None = None,
) -> tuple[dict[str, np.ndarray], Any, Any]:
    """Train members `i = (hyper[h][i], seeds[i], folds[i])` in chunks; return per-epoch
    metrics `(members, epochs)` and the final params and model_state stacked over members.
    `run_epoch(guarded)`: the jitted epoch, unguarded until a member has a fault (the
    epoch is replayed guarded, as is the rest of the chunk)."""
    inits = {
        s: init_state(task, opt, jax.random.PRNGKey(s), tuner=tuner) for s in set(seeds.tolist())
    }
    steps_per_epoch = d.n_train // batch_size
    n = len(seeds)
    n_chunks = -(-n // chunk_size)
    bar = report.progress_bar(progress and jax.process_index() == 0, n_chunks * epochs, initial=0)
    history, finals = [], []

    def place(tree: Any, where: str) -> Any:
        if layout is None or tree is None:
            return tree
        return layout.put(tree, getattr(layout, where)(tree))

    train, val = place(d.train, "replicated"), place(d.val, "replicated")
    for c in range(n_chunks):
        members = np.minimum(np.arange(c * chunk_size, (c + 1) * chunk_size), n - 1)
        real = min(chunk_size, n - c * chunk_size)
        state = jax.tree.map(lambda *a: jnp.stack(a), *(inits[s] for s in seeds[members].tolist()))
        opt_state = set_hyperparams(state.opt_state, **{h: v[members] for h, v in hyper.items()})
        state = state._replace(opt_state=opt_state)
        if tuner is not None:  # each member's tuner starts from its own λ
            state = state._replace(tuner=jax.vmap(tuner.init)(opt_state, state.params))
        one = len(set(seeds[members].tolist())) == 1  # a seed: one batch order for all
        rows, held = d.member_rows(folds[members])
        state, rows, held = (place(t, "members") for t in (state, rows, held))
        records, used = [], []  # used: the guard flags the chunk's epochs ran with
        for length in chunks(0, epochs * steps_per_epoch, steps_per_epoch, None):
            start = jnp.asarray(len(records) * steps_per_epoch, jnp.int32)
            shared = place((inits[seeds[members[0]]].rng, start), "replicated") if one else None
            args = (train, rows, val, held, length, shared)

            def epoch(s: TrainState, g: bool, args: tuple = args, used: list = used) -> tuple:
                used.append(g)
                return run_epoch(g)(s, *args)

            state, record = epoch(state, True) if True in used else replay_faulty(epoch, state)
            records.append({k: v[:real] for k, v in _gather(record).items()})
            bar.update(1)
            bar.set_postfix(
                chunk=f"{c + 1}/{n_chunks}", val_loss=f"{records[-1]['val_loss'].mean():.3f}"
            )
        history.append({k: np.stack([r[k] for r in records], axis=1) for k in records[0]})
        finals.append(
            jax.tree.map(lambda a, r=real: a[:r], _gather((state.params, state.model_state)))
        )
    bar.close()
    params, model_state = jax.tree.map(lambda *a: np.concatenate(a), *finals)
    return {k: np.concatenate([h[k] for h in history]) for k in history[0]}, params, model_state


def _warn_if_decay_underflows(params: Any, history: dict, layout: Layout | None) -> None:
    """Warn when a member's per-step decay factor `c·λ` was below half an ulp of the
    lowest-precision float params, where `w·(1 − c·λ)` rounds back to `w`."""
    dtypes = [x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not dtypes or "decay_factor" not in history:
        return
    if layout is not None and layout.compute_dtype is not None:
        return  # float32 master params
    low = min(dtypes, key=lambda t: jnp.finfo(t).bits)
    half_ulp = float(jnp.finfo(low).eps) / 2
    factors = np.asarray(history["decay_factor"][:, -1], np.float64)
    under = np.flatnonzero((factors > 0) & (factors < half_ulp))
    if under.size:
        warnings.warn(
            f"{under.size} sweep member(s) (first: member {int(under[0])}) decay by c·λ = "
            f"{factors[under[0]]:.3g} per step, below the resolution of {low} (eps/2 = "
            f"{half_ulp:.3g}): w·(1 − c·λ) rounds to w and their decay does nothing; keep "
            "float32 master weights (Layout(compute_dtype=...)) or raise λ",
            RuntimeWarning,
            stacklevel=3,
        )


def _gather(tree: Any) -> Any:
    """Host NumPy copies of (possibly member-sharded, multi-process) arrays."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _grid(
    weight_decay: Sequence[float] | None,
    learning_rate: Sequence[float] | None,
    l1: Sequence[float] | None,
    hyperparams: Mapping[str, Sequence[float]] | None,
) -> dict[str, list[float]]:
    grid = {"weight_decay": weight_decay, "learning_rate": learning_rate, "l1": l1}
    grid = {k: list(v) for k, v in grid.items() if v is not None}
    for name, values in {**grid, **(hyperparams or {})}.items():
        if not values:
            raise ValueError(f"{name} needs at least one value")
        for v in values:
            check_rate(v, name)
    return grid | {k: list(v) for k, v in (hyperparams or {}).items()}


def sweep(
    data: data_lib.Dataset | str | Any = "digits",
    *,
    model: Task | models.Model | str = "mlp",
    model_config: Mapping[str, Any] | None = None,
    optimizer: str | optax.GradientTransformation = "adamw",
    optimizer_config: Mapping[str, Any] | None = None,
    weight_decay: Sequence[float] | None = (0.0, 1e-4, 1e-3, 1e-2),
    learning_rate: Sequence[float] | None = None,
    l1: Sequence[float] | None = None,
    hyperparams: Mapping[str, Sequence[float]] | None = None,
    seeds: Sequence[int] = (0,),
    folds: int | None = None,
    fold_seed: int = 0,
    stratified: bool | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    penalties: Sequence[Penalty] = (),
    mask: Mask = masks.DEFAULT,
    select: Select = "best",
    metric: str | None = None,
    maximize: bool | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    layout: Layout | None = None,
    tuner: Tuner | None = None,
    batching: Literal["vmap", "map"] = "vmap",
) -> SweepResult:
    """Train every member of the grid `weight_decay × learning_rate × l1 × hyperparams ×
    seeds (× folds)` together, and choose a setting.

    `data`: a Dataset, a name for [`wdjax.lab.data.load`][], `(train, val)` pytrees
    of arrays, or one pytree of training arrays (with `folds`). `model`: a name for
    [`wdjax.lab.models.create`][] (with `model_config`), a Model, or your own
    [`Task`][wdjax.lab.tasks.Task]. `optimizer`: a name in
    [`wdjax.optimizers.OPTIMIZERS`][] built with `optimizer_config` (`momentum`,
    `lr_coupling`, `mask`...), or any optimizer whose swept hyperparameters are
    injected (every wdjax optimizer; `optax.inject_hyperparams(...)`). A grid axis left
    `None` is not swept (a named optimizer then uses η = 1e-3 and no L1 step);
    `hyperparams` sweeps further injected ones by name. `penalties` are added to
    the loss; `mask` is the decayed group of the weight-norm metrics.

    Selection: `metric` (a validation metric of the task; default `accuracy` if it
    has one, else `loss`), maximized or minimized (default: maximize names ending in
    `accuracy`), by `select` (see [`wdjax.lab.selection.select_setting`][]).
    `chunk_size`: members trained at once (default: as many as fit
    [`wdjax.lab.memory.memory_budget`][]).

    `layout` (a [`wdjax.distributed.Layout`][] over a `members` axis, and optionally a
    `data` axis): members are split over `members` (no collectives between them),
    each member's batches over `data`. `chunk_size` is then per device along
    `members`, and the last chunk is padded to a multiple of that axis. Under several
    processes every process calls `sweep` alike and gets all results.

    `tuner` (a [`wdjax.hypergradient.Tuner`][] of `optimizer`): each member's λ tunes
    itself from its grid value (so `weight_decay` is the grid of *initial* λs) on
    batches of its held-out rows; the history holds each member's λ per epoch.

    `batching`: a chunk's members train as one batched program (`"vmap"`), or one after
    another inside one compiled program (`"map"`, `lax.map`: the same results; faster
    for members that fill the machine alone — on a 2-core CPU, MLPs of width ≥ 1024,
    where XLA:CPU's batched matmuls ran 30–37% slower than the members' own)."""
    if batching not in ("vmap", "map"):
        raise ValueError(f"batching must be 'vmap' or 'map', got {batching!r}")
    if batching == "map" and layout is not None:
        raise ValueError("a layout splits members over devices: use batching='vmap'")
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if epochs < 1 or not seeds or (chunk_size is not None and chunk_size < 1):
        raise ValueError(
            f"need epochs >= 1, seeds and chunk_size >= 1, got {epochs}, {seeds}, {chunk_size}"
        )
    if folds is not None and folds < 2:
        raise ValueError(f"folds must be >= 2 (or None for the validation split), got {folds}")
    ds = data_lib.load(data) if isinstance(data, str) else data
    if isinstance(model, str):
        if not isinstance(ds, data_lib.Dataset):
            raise ValueError("a reference model by name needs a Dataset; pass a Model or Task")
        shape = {"input_shape": ds.input_shape, "num_classes": ds.num_classes}
        model = models.create(model, **shape, **(model_config or {}))
    task = tasks.as_task(model)
    named = isinstance(optimizer, str)
    if named and learning_rate is None:
        learning_rate = (1e-3,)
    grid = _grid(weight_decay, learning_rate, l1, hyperparams)
    if select == "one_se" and "weight_decay" not in grid:
        raise ValueError("select='one_se' picks the largest λ: sweep weight_decay")
    if named:
        options = tuple(sorted((optimizer_config or {}).items()))
        opt = _cached(
            _named_optimizer, optimizer, options, grid["learning_rate"][0], l1 is not None
        )
    elif optimizer_config:
        raise ValueError("optimizer_config is for named optimizers; configure your optimizer")
    else:
        opt = optimizer

    d = _Data.of(ds, folds, fold_seed, stratified)
    batch_size = min(batch_size, d.n_train)
    if layout is not None and {"fsdp", "model"} & set(layout.mesh.axis_names):
        raise ValueError("a sweep's layout has members and data axes only (each member whole)")
    if layout is not None and batch_size % layout.data_size:
        raise ValueError(
            f"batch size {batch_size} does not split over the layout's {layout.data_size} "
            f"data-parallel devices: use a multiple of {layout.data_size}"
        )
    if tuner is not None and tuner.optimizer is not opt:
        raise ValueError("the tuner must be built on the sweep's optimizer: Tuner(optimizer)")
    key = (task, opt, batch_size, tuple(penalties), mask, layout, tuner, batching)
    programs = {True: _cached(_program, *key, True)}  # each epoch compiles when first run
    step = programs[True][0]

    def run_epoch(guarded: bool) -> Callable:
        if guarded not in programs:
            programs[guarded] = _cached(_program, *key, guarded)
        return programs[guarded][1]

    state = jax.eval_shape(lambda: init_state(task, opt, jax.random.PRNGKey(0), tuner=tuner))
    missing = set(grid) - _injected(state.opt_state)
    if missing:
        raise ValueError(
            f"the optimizer does not inject {sorted(missing)}: use a wdjax optimizer or "
            "optax.inject_hyperparams"
        )
    val_names = jax.eval_shape(
        lambda s, b: task.per_example(s.params, s.model_state, b),
        state,
        jax.tree.map(lambda a: a[:1], d.val),
    )
    metric = metric or ("accuracy" if "accuracy" in val_names else "loss")
    if metric not in val_names:
        raise ValueError(f"metric {metric!r} is not a validation metric: {sorted(val_names)}")
    maximize = metric.endswith("accuracy") if maximize is None else maximize

    settings = [
        dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
    ]
    runs = list(itertools.product(range(len(settings)), seeds, range(folds or 1)))
    setting_of, seed_of, fold_of = (np.array(v) for v in zip(*runs, strict=True))
    hyper = {h: np.array([settings[s][h] for s in setting_of], np.float32) for h in grid}
    if chunk_size is None:
        batch = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((batch_size, *a.shape[1:]), a.dtype), d.train
        )
        batch = batch if tuner is None else (batch, batch)  # a tuner's steps take two
        # the state, a step's intermediates, and the copy of the state an epoch may replay from
        chunk_size = memory_budget() // (member_bytes(step, state, batch) + nbytes(state))
        if jax.process_count() > 1:  # every process must run the same chunks: process 0's
            chunk_size = int(multihost_utils.broadcast_one_to_all(np.int64(chunk_size)))
    width = 1 if layout is None else layout.size("members")  # chunk_size is per device
    chunk_size = width * max(1, min(chunk_size, -(-len(runs) // width)))
    history, params, model_state = _train(
        task, opt, run_epoch, d, hyper, seed_of.astype(np.int32), fold_of,
        epochs=epochs, batch_size=batch_size, chunk_size=chunk_size, progress=progress,
        layout=layout, tuner=tuner,
    )  # fmt: skip
    _warn_if_decay_underflows(state.params, history, layout)

    final = {k: v[:, -1] for k, v in history.items()}
    members = [
        {"setting": s, "seed": seed, "fold": fold if folds else None}
        | {k: float(v[i]) for k, v in final.items()}
        | settings[s]  # exact grid values, over the float32 ones the step reports
        for i, (s, seed, fold) in enumerate(runs)
    ]
    stats = {k: v for k, v in final.items() if k != "skipped"}
    summary = [{**values, **summarize(stats, setting_of == s)} for s, values in enumerate(settings)]
    chosen = select_setting(
        summary, f"val_{metric}", maximize=maximize, select=select, names=list(grid)
    )
    config = {
        "dataset": getattr(ds, "name", "arrays"),
        "model": task.name,
        "model_config": dict(getattr(model, "config", ())),
        "optimizer": optimizer if named else repr(type(optimizer).__name__),
        "optimizer_config": {
            k: v if isinstance(v, (bool, int, float, str)) else repr(v)
            for k, v in (optimizer_config or {}).items()
        },
        "grid": grid,
        "seeds": list(seeds),
        "folds": folds,
        "fold_seed": fold_seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "select": select,
        "metric": metric,
        "maximize": maximize,
        "chunk_size": chunk_size,
        "batching": batching,
        "layout": None if layout is None else layout.describe(),
        "members": len(runs),
        "runs_per_setting": len(runs) // len(settings),
    }
    return SweepResult(summary, members, history, params, model_state, chosen, config)
