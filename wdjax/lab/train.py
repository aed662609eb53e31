"""A pure, jit-compiled train step and a fit loop with no per-step host round trip.

`make_train_step(model, optimizer)` gives `step(state, batch) -> (state, metrics)`:

    (L, aux), g = value_and_grad(data_loss + Σ penalties)(params)
    u, opt_state = optimizer.update(g, opt_state, params);  params ← params + u

skipping (and counting, never applying) steps whose loss, gradients or update are not
finite. [`fit`][wdjax.lab.train.fit] runs whole epochs, or the stretch up to the next
checkpoint, as one `lax.scan` of unguarded steps, and replays a stretch that had a fault
from its start with the guard. The batch order and dropout keys are pure functions of
the step, so resuming from a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import distributed, masks
from wdjax.distributed import Layout
from wdjax.hypergradient import Tuner
from wdjax.lab import compiler, tasks
from wdjax.lab.report import progress_bar
from wdjax.lab.tasks import Batch, Metrics, Task, as_task
from wdjax.optimizers import set_hyperparams
from wdjax.penalties import Penalty, regularized
from wdjax.transforms import DecayState
from wdjax.types import Mask, Params, is_float

__all__ = [
    "FitResult",
    "TrainState",
    "batch_order",
    "chunks",
    "epoch_batches",
    "epoch_record",
    "evaluate",
    "fit",
    "global_norm",
    "init_state",
    "init_state_on",
    "make_train_step",
    "progress_bar",
    "replay_faulty",
    "run_steps",
    "splits",
    "stretch_faulty",
    "weight_metrics",
]


class TrainState(NamedTuple):
    """Everything a run carries; a pytree, so it jits, vmaps and checkpoints."""

    step: jax.Array
    params: Params
    opt_state: Any
    model_state: Any
    rng: jax.Array
    skipped: jax.Array  # steps dropped for non-finite gradients
    tuner: Any = None  # a wdjax.hypergradient.TunerState when λ tunes itself


def init_state(
    model: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    params: Params = None,
    tuner: Tuner | None = None,
) -> TrainState:
    """Initialize params from `key` (or start from given `params`, e.g. to fine-tune)
    and the optimizer state from the params (and the `tuner`'s from the optimizer's).
    `model`: a Task or a reference Model."""
    init_key, run_key = jax.random.split(key)
    fresh, model_state = as_task(model).init(init_key)
    params = fresh if params is None else jax.tree.map(jnp.array, params)  # a copy: donated
    step, skipped = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)  # distinct buffers
    opt_state = optimizer.init(params)
    tuned = None if tuner is None else tuner.init(opt_state, params)
    return TrainState(step, params, opt_state, model_state, run_key, skipped, tuned)


def hyperparam(opt_state: Any, name: str) -> jax.Array:
    """The current value of an injected hyperparameter (NaN if the optimizer has none)."""
    injected = jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
    values = [s.hyperparams[name] for s in injected if name in getattr(s, "hyperparams", {})]
    return jnp.asarray(values[0] if values else jnp.nan, jnp.float32)


def _total(x: jax.Array) -> jax.Array:
    """`Σx` in float32, as a matrix–vector product with ones: XLA:CPU runs a full
    reduction far below memory speed and a product at memory speed (an MLP's gradient
    norm: 9% of its train step as `jnp.sum`, none as this; benchmarks/HISTORY.md)."""
    if x.size == 0:
        return jnp.zeros([], jnp.float32)
    rows = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    ones = jnp.ones(rows.shape[1], rows.dtype)
    highest = jax.lax.Precision.HIGHEST  # no bf16/TF32 passes on TPU/GPU
    return jnp.sum(jnp.dot(rows, ones, precision=highest, preferred_element_type=jnp.float32))


def _sq_norm(leaves: Sequence[jax.Array], total: Callable = jnp.sum) -> jax.Array:
    """`Σ w²` over `leaves`, each leaf's sum by `total`."""
    zero = jnp.zeros([], jnp.float32)
    return sum((total(jnp.square(w.astype(jnp.float32))) for w in leaves), zero)


def global_norm(tree: Any) -> jax.Array:
    """`‖g‖ = √(Σ g²)` over the float leaves of `tree`, in float32: `optax.tree.norm`'s
    value, as matrix–vector products (see `_total`: a train step's gradient norm costs
    nothing measurable this way; its weight norms are cheaper as plain sums)."""
    return jnp.sqrt(_sq_norm([x for x in jax.tree.leaves(tree) if is_float(x)], _total))


def weight_metrics(params: Params, decayed: Sequence[bool]) -> Metrics:
    """Global and per-group (decayed / not decayed) weight norms, fraction of exact zeros."""
    floats = [(w, d) for w, d in zip(jax.tree.leaves(params), decayed) if is_float(w)]
    size = sum(w.size for w, _ in floats)
    zero = jnp.zeros([], jnp.float32)
    zeros = sum((jnp.sum((w == 0).astype(jnp.float32)) for w, _ in floats), zero)
    on = _sq_norm([w for w, d in floats if d])
    off = _sq_norm([w for w, d in floats if not d])
    return {
        "weight_norm": jnp.sqrt(on + off),
        "weight_norm_decayed": jnp.sqrt(on),
        "weight_norm_other": jnp.sqrt(off),
        "zero_fraction": zeros / max(size, 1),
    }


def _all_finite(tree: Any) -> jax.Array:
    """True when every element of every float leaf is finite: `Σ 0·x` is 0, or NaN
    if any `x` is NaN or ±∞ (and never overflows)."""
    zero = jnp.zeros([], jnp.float32)
    return jnp.isfinite(sum((_total(0 * x) for x in jax.tree.leaves(tree) if is_float(x)), zero))


@jax.jit
def stretch_faulty(before: TrainState, after: TrainState) -> jax.Array:
    """True when `guard=False` steps from `before` to `after` (one run, or stacked
    members: then any of them) include one the guard would have skipped: a step counted
    in `skipped`, or a value of the params or the optimizer state that was finite
    before and is not after (an applied non-finite update leaves one: NaN survives
    every operation of an update but a select, ±∞ stays ±∞ or becomes NaN; only a
    transform that clips the params themselves could hide it; values non-finite from
    the start, such as a best-so-far of +∞, do not count)."""

    def became(b: jax.Array, a: jax.Array) -> jax.Array:
        return jnp.any(jnp.isfinite(b) & ~jnp.isfinite(a)) if is_float(a) else jnp.array(False)

    def watched(s: TrainState) -> tuple:
        return s.params, s.opt_state

    def new_non_finite() -> jax.Array:  # `before` is read only when `after` is not clean
        pairs = zip(jax.tree.leaves(watched(before)), jax.tree.leaves(watched(after)))
        return jnp.any(jnp.stack([became(b, a) for b, a in pairs]))

    clean = _all_finite(watched(after))
    new = jax.lax.cond(clean, lambda: jnp.array(False), new_non_finite)
    return jnp.any(after.skipped != before.skipped) | new


def replay_faulty(
    stretch: Callable[[TrainState, bool], tuple[TrainState, Any]], state: TrainState
) -> tuple[TrainState, Any]:
    """`stretch(state, guarded)` (steps from `state`, which it may donate) run unguarded
    from a copy of `state` kept on the device, and again from that copy, guarded, when
    [`stretch_faulty`][wdjax.lab.train.stretch_faulty]: the guarded stretch's result at
    about the unguarded one's cost (one copy of the state, one reduction, one host read).
    [`fit`][wdjax.lab.train.fit]`(guard="replay")` runs every stretch so."""
    before = _copy(state)
    after, out = stretch(state, False)
    if stretch_faulty(before, after):
        return stretch(before, True)
    return after, out


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # keeps each leaf's sharding


def _hyperparams_ok(opt_state: Any) -> jax.Array:
    """True when every injected hyperparameter is finite and `>= 0`, and every
    decoupled decay's per-step factor `c_t·λ` is below 1."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
    values = [
        v for s in found for v in jax.tree.leaves(getattr(s, "hyperparams", {})) if is_float(v)
    ]
    ok = [jnp.all(jnp.isfinite(v) & (v >= 0)) for v in values]
    ok += [f < 1 for f in _decay_factors(opt_state)]
    return jnp.all(jnp.stack(ok or [jnp.array(True)]))


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
_SCHEDULED = (*_INJECTED, optax.ScaleByScheduleState, DecayState)


def _schedules_moved_on(old: Any, new: Any) -> Any:
    """`old` optimizer state with what its schedules read taken from `new` (the step
    counts of `inject_hyperparams`, `scale_by_schedule` and wdjax's decays, and the
    states of injected schedules): a skipped step leaves moments, Adam's own count and
    the params alone but moves every schedule on, as PyTorch's LR schedulers step when
    `GradScaler` skips `optimizer.step()`. A schedule bad at one step costs that step only."""

    def moved(o: Any, n: Any) -> Any:
        if not isinstance(o, _SCHEDULED):
            return o
        o = o._replace(count=n.count)
        if isinstance(o, optax.InjectStatefulHyperparamsState):
            o = o._replace(hyperparams_states=n.hyperparams_states)
        if isinstance(o, _INJECTED):
            o = o._replace(inner_state=_schedules_moved_on(o.inner_state, n.inner_state))
        return o

    return jax.tree.map(moved, old, new, is_leaf=lambda x: isinstance(x, _SCHEDULED))


def _decay_factors(opt_state: Any) -> list[jax.Array]:
    """The per-step factors `c_t·λ` the decoupled decays in `opt_state` last applied."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, DecayState))
    return [s.factor for s in found if isinstance(s, DecayState) and s.factor is not None]


def decay_factor(opt_state: Any) -> jax.Array:
    """The largest per-step decay factor `c_t·λ` of the last update (NaN if none)."""
    factors = _decay_factors(opt_state)
    return jnp.max(jnp.stack(factors)) if factors else jnp.array(jnp.nan, jnp.float32)


def make_train_step(
    model: Task | Any,
    optimizer: optax.GradientTransformation,
    *,
    penalties: Sequence[Penalty] = (),
    mask: Mask = masks.DEFAULT,
    layout: Layout | None = None,
    tuner: Tuner | None = None,
    weight_metrics_each_step: bool = True,
    update_in_cond: bool = True,
    guard: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `step(state, batch) -> (state, metrics)` (not jitted: jit it, scan it
    or vmap it; [`fit`][wdjax.lab.train.fit] does all three as needed):

    ```text
    (L, aux), g = value_and_grad(task loss + Σ penalties)(params)
    u, opt_state = optimizer.update(g, opt_state, params);  params ← params + u
    ```

    `guard=True`: a step is skipped and counted (`skipped`), never applied, when its
    loss, gradients or update are not finite, or when a hyperparameter the optimizer
    injects (η, λ, α from a schedule) is negative or not finite at that step; its
    schedules still move on (the step counts they read), nothing else in the optimizer
    state does. The decision is one `lax.cond` whose applied branch computes the update
    itself (the predicate's own evaluation of it only feeds a reduction), so XLA writes
    the new state in place and copies nothing. `update_in_cond=False` for a step you
    `vmap` (as [`sweep`][wdjax.lab.sweeps.sweep] does): `vmap` makes the `cond` a select
    that evaluates both branches, and the update is then computed once, outside.

    `guard=False`: the update is applied as a hand-written Optax step applies it, each
    leaf's as soon as its gradient is ready (under the guard, every update waits for the
    last gradient and the check of the whole update: 4–19 % of a step of the benchmarks'
    MLP and CNN on CPU). `skipped` then counts the steps whose loss, gradient norm or
    hyperparameters were bad, *applied* anyway; a non-finite update shows as a
    non-finite state. [`stretch_faulty`][wdjax.lab.train.stretch_faulty] tells both, and
    [`fit`][wdjax.lab.train.fit] replays such a stretch with the guard.

    `model`: a [`Task`][wdjax.lab.tasks.Task] or a reference Model.

    Metrics: `loss` (data loss), the task's metrics (`accuracy`), each penalty by
    name, `grad_norm`, weight norms (global and for the `mask`'s decayed / other
    groups), `zero_fraction`, `learning_rate` and `weight_decay` (NaN if the
    optimizer does not inject them) and `skipped`.

    `layout`: each batch is constrained to its data-parallel sharding, and the loss is
    computed in its `compute_dtype` (see [`wdjax.distributed.Layout`][]).

    `weight_metrics_each_step=False` leaves out the weight norms and zero fraction, which
    read every parameter (a pass over memory a step); `fit` computes them once an epoch.

    `tuner` (a [`wdjax.hypergradient.Tuner`][]): `batch` is then `(train, held_out)`;
    after an applied update, the held-out loss's gradient at the new params drives one
    hypergradient step on `log λ` (metric `hypergradient`; `weight_decay` is the new λ)."""
    task = as_task(model)
    if layout is not None and layout.compute_dtype is not None:
        task = tasks.in_dtype(task, layout.compute_dtype)
    objective = regularized(task.loss, *penalties, has_aux=True)

    def held_out_grads(params: Params, model_state: Any, held: Batch) -> Params:
        def loss(p: Params) -> jax.Array:
            return jnp.mean(task.per_example(p, model_state, held)["loss"])

        return jax.grad(loss)(params)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        held = None
        if tuner is not None:
            batch, held = batch
        if layout is not None:
            batch = layout.constrain_batch(batch)
        rng = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)

        def value_and_grad(params: Params) -> tuple:
            grad_fn = jax.value_and_grad(objective, has_aux=True)
            return grad_fn(params, state.model_state, batch, rng)

        tuned = state.tuner
        if tuner is not None and tuner.horizon > 1:  # the update and its tangents in λ
            (total, aux), grads, updates, new_opt_state, tuned = tuner.forward(
                tuned, value_and_grad, state.opt_state, state.params
            )
        else:
            (total, aux), grads = value_and_grad(state.params)
            updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        model_state, task_metrics = aux.pop("aux")
        grad_norm = global_norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(total) & _hyperparams_ok(new_opt_state)
        if not guard:  # nothing waits for `ok`: each update starts when its gradient is ready
            params, opt_state = optax.apply_updates(state.params, updates), new_opt_state
        else:
            ok &= _all_finite(updates)

            def apply() -> tuple:  # the update again, written in place (a pass-through copies)
                forward = tuner is not None and tuner.horizon > 1  # tangents come with it
                u, s = (
                    optimizer.update(grads, state.opt_state, state.params)
                    if update_in_cond and not forward
                    else (updates, new_opt_state)
                )
                return optax.apply_updates(state.params, u), s, model_state

            def skip() -> tuple:
                moved = _schedules_moved_on(state.opt_state, new_opt_state)
                return state.params, moved, state.model_state

            params, opt_state, model_state = jax.lax.cond(ok, apply, skip)
        skipped = state.skipped + (~ok).astype(jnp.int32)
        extra = {}
        if tuner is not None:
            g_held = held_out_grads(params, model_state, held)

            def hvp(v: Params) -> Params:  # the training loss's Hessian at θ⁺, times v
                def grad(p: Params) -> Params:
                    return jax.grad(lambda q: objective(q, model_state, batch, rng)[0])(p)

                return jax.jvp(grad, (params,), (v,))[1]

            if tuner.horizon > 1:
                h = tuner.contract(tuned, g_held)
            else:
                h = tuner.hypergradient(grads, state.opt_state, state.params, g_held, hvp)
            tuned = jax.tree.map(  # a skipped step leaves λ and the tangents as they were
                lambda a, b: jnp.where(ok, a, b), tuner.update(tuned, h), state.tuner
            )
            opt_state = new_opt_state = tuner.apply(tuned, opt_state)
            h, names = tuned.hypergradient, tuner.names
            extra = (
                {"hypergradient": h}
                if h.ndim == 0
                else {
                    **{f"hypergradient/{n}": h[i] for i, n in enumerate(names)},
                    **{f"rate/{n}": jnp.exp(tuned.log_rate[i]) for i, n in enumerate(names)},
                }
            )
        new_state = TrainState(
            state.step + 1, params, opt_state, model_state, state.rng, skipped, tuned
        )
        metrics = {
            "loss": aux.pop("data_loss"),
            **aux,
            **task_metrics,
            "grad_norm": grad_norm,
            **(
                weight_metrics(new_state.params, masks.resolve(new_state.params, mask))
                if weight_metrics_each_step
                else {}
            ),
            "learning_rate": hyperparam(new_opt_state, "learning_rate"),
            "weight_decay": hyperparam(new_opt_state, "weight_decay"),
            "decay_factor": decay_factor(new_opt_state),
            "skipped": skipped,
            **extra,
        }
        return new_state, metrics

    return step


def epoch_batches(rng: jax.Array, epoch: jax.Array, n: int, batch_size: int) -> jax.Array:
    """Indices `(steps_per_epoch, batch_size)` of one epoch: a permutation keyed
    by `(rng, epoch)`; the remainder that does not fill a batch is dropped."""
    perm = jax.random.permutation(jax.random.fold_in(jax.random.split(rng)[0], epoch), n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


def batch_order(rng: jax.Array, step: jax.Array, n: int, batch_size: int, length: int) -> jax.Array:
    """Indices `(length, batch_size)` into `n` rows of the batches of steps `step …
    step + length − 1` (all in one epoch), as [`epoch_batches`][wdjax.lab.train.epoch_batches]
    orders them."""
    per_epoch = n // batch_size
    idx = epoch_batches(rng, step // per_epoch, n, batch_size)
    return jax.lax.dynamic_slice_in_dim(idx, step % per_epoch, length)


def run_steps(
    step: Callable,
    state: TrainState,
    data: Batch,
    batch_size: int,
    length: int,
    rows: jax.Array | None = None,
    unroll: bool = False,
    held: Batch | None = None,
    order: jax.Array | None = None,
) -> tuple[TrainState, Metrics]:
    """`length` steps from `state.step` as one `lax.scan`, all within one epoch.

    `data` is a pytree of arrays with a leading example axis (`{"x", "y"}`).
    `rows` (optional) restricts training to those example indices (a fold), so
    vmapped members can train on different subsets of one copy of the data.
    `unroll=True` unrolls the scan (see [`fit`][wdjax.lab.train.fit] on convolutions on CPU).
    `held`: held-out data; each step then gets `(batch, held-out batch)` (for a tuner).
    `order`: the steps' [`batch_order`][wdjax.lab.train.batch_order], when it is computed
    once for vmapped members that share a seed (their batches are then one unbatched
    array, and a first layer one matmul for all members)."""
    n = jax.tree.leaves(data)[0].shape[0] if rows is None else rows.shape[0]
    if order is None:
        order = batch_order(state.rng, state.step, n, batch_size, length)
    idx = order if rows is None else rows[order]

    n_held = None if held is None else jax.tree.leaves(held)[0].shape[0]

    def body(state: TrainState, i: jax.Array) -> tuple[TrainState, Metrics]:
        batch = jax.tree.map(lambda a: a[i], data)
        if held is not None:  # a held-out batch for the tuner, drawn by (rng, step)
            key = jax.random.fold_in(jax.random.split(state.rng, 3)[2], state.step)
            j = jax.random.randint(key, (batch_size,), 0, n_held)
            batch = (batch, jax.tree.map(lambda a: a[j], held))
        return step(state, batch)

    return jax.lax.scan(body, state, idx, unroll=unroll)


@functools.cache
def _evaluate() -> Callable:
    """`tasks.evaluate`, jitted with the lab's compile options (chosen at first use, once
    the backend is up)."""
    return jax.jit(
        tasks.evaluate, static_argnames=("task", "batch_size"), compiler_options=compiler.options()
    )


def evaluate(
    model: Task | Any,
    params: Params,
    model_state: Any,
    data: Batch,
    y: Any = None,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Eval-mode means of the task's metrics over `data` (for a reference model,
    `{"loss", "accuracy"}`), as Python floats. `evaluate(model, p, s, x, y)` is
    short for `data={"x": x, "y": y}`."""
    if y is not None:
        data = {"x": data, "y": y}
    mesh = distributed.mesh_of(params)  # sharded params: the data joins their mesh
    data = jax.tree.map(jnp.asarray, data) if mesh is None else distributed.replicate(data, mesh)
    out = _evaluate()(as_task(model), params, model_state, data, batch_size=batch_size)
    return {k: float(v) for k, v in jax.device_get(out).items()}


def splits(data: Any, host: bool = False) -> tuple[Batch, Batch]:
    """`(train, val)` pytrees of arrays from a [`wdjax.lab.data.Dataset`][] or a
    `(train, val)` pair; JAX arrays, or as given with `host=True`."""
    if hasattr(data, "arrays"):
        return data.arrays("train"), data.arrays("val")
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return tuple(d if host else jax.tree.map(jnp.asarray, d) for d in data)
    raise TypeError(f"expected a wdjax.lab.data.Dataset or (train, val) arrays, got {data!r}")


def chunks(start: int, total: int, steps_per_epoch: int, every: int | None) -> Iterator[int]:
    """Lengths of the scans from `start` to `total`: each ends at an epoch end,
    a multiple of `every` (checkpoints) or `total`."""
    s = start
    while s < total:
        end = min(total, (s // steps_per_epoch + 1) * steps_per_epoch)
        if every:
            end = min(end, (s // every + 1) * every)
        yield end - s
        s = end


@dataclasses.dataclass
class FitResult:
    """What [`fit`][wdjax.lab.train.fit] returns."""

    state: TrainState  # final (or, with early stopping, best) state; always finite
    history: list[dict[str, float]]  # one record per epoch
    stopped_early: bool = False
    diverged: bool = False  # the last epoch's loss or validation loss was not finite, or
    # every step of the last epoch was skipped


def fit(
    model: Task | Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    penalties: Sequence[Penalty] = (),
    mask: Mask = masks.DEFAULT,
    patience: int | None = None,
    checkpoints: Any = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float], list[dict]], None] | None = None,
    params: Params = None,
    scan: bool = True,
    hyperparams: dict[str, float] | None = None,
    layout: Layout | None = None,
    feed: Literal["device", "host"] = "device",
    tuner: Tuner | None = None,
    weight_metrics: Literal["epoch", "step"] = "epoch",
    guard: Literal["replay", "step"] = "replay",
) -> FitResult:
    """Train `model` (a [`Task`][wdjax.lab.tasks.Task] or a reference Model) on
    `data` (a [`wdjax.lab.data.Dataset`][] or `(train, val)` arrays) for `epochs`.

    Each epoch (or stretch up to a checkpoint) is one jit-compiled, buffer-donating
    `lax.scan` over device-resident data. `patience`: stop when the validation
    loss has not improved for that many epochs and keep the best state.
    `checkpoints`: a [`wdjax.lab.checkpoint.Checkpointer`][]; training resumes from
    its latest checkpoint, if any. `on_epoch(record, step_metrics)` sees each
    epoch's record and its per-step metrics (as host lists). `params`: start from
    these instead of a fresh init (fine-tuning). `hyperparams`: injected values set
    into the optimizer state after init or restore (`set_hyperparams`: no recompile);
    on a resumed run the next epoch record lists them under `hyperparams_set`.

    `layout` (a [`wdjax.distributed.Layout`][]): the state is created sharded by it
    (`jit(init, out_shardings=...)`, never whole on one device), steps are jitted with
    its shardings and donation, batches are split over its data axes, and a resume
    restores onto it. Under several processes (`jax.distributed.initialize`) every
    process runs `fit` with the same arguments; only process 0 shows progress.

    `feed="host"`: the training data stays in host memory (NumPy arrays or memmaps,
    anything indexable by row arrays) and each process reads only its rows of each
    global batch, one step at a time; the batch order is the same pure function of
    `(seed, step)` as on the device path, so the runs are equal.

    `tuner` (a [`wdjax.hypergradient.Tuner`][]): λ tunes itself during training by
    hypergradient steps on batches of the *validation* split (so the validation
    figures are no longer untouched by training; the test split is). The history then
    records λ (`weight_decay`) and the `hypergradient`.

    `weight_metrics`: the weight norms and zero fraction, which read every parameter,
    are computed once an epoch from its last params (`"epoch"`, the values the history
    records either way) or by every step too (`"step"`: in the per-step metrics that
    `on_epoch` sees, at the cost of a pass over the params a step).

    `guard`: how steps with a non-finite loss, gradient or update, or a bad injected
    hyperparameter, are skipped (see [`make_train_step`][wdjax.lab.train.make_train_step]).
    `"replay"`: each stretch runs the unguarded step, as fast as a hand-written Optax
    step, from a copy of its start state kept on the device; a stretch that
    [`stretch_faulty`][wdjax.lab.train.stretch_faulty] finds faulty runs again from that
    copy with the guarded step, so the run is the guarded run (the guarded program is
    compiled only then). `"step"`: every step is guarded, and no copy is kept (for a
    state that must not be held twice).

    `scan=False` dispatches the steps one by one (asynchronously: still no host round
    trip per step) instead of one `lax.scan` per stretch: for models whose backward
    pass XLA:CPU runs slowly inside a loop, such as plain `lax` convolutions
    (jax-ml/jax#12868; the reference CNN avoids this with [`wdjax.lab.ops`][])."""
    if tuner is not None and feed == "host":
        raise ValueError("a tuner needs the device feed (feed='device')")
    if layout is None and jax.process_count() > 1:
        raise ValueError(
            f"fit runs in {jax.process_count()} processes without a layout, so each would "
            "train alone on its own devices: pass layout=wdjax.distributed.Layout("
            "wdjax.distributed.make_mesh('data=-1')) (CLI: --mesh data=-1)"
        )
    if layout is not None and layout.size("members") > 1:
        raise ValueError("a layout's members axis is for sweeps; fit uses data, fsdp, model")
    if weight_metrics not in ("epoch", "step"):
        raise ValueError(f"weight_metrics must be 'epoch' or 'step', got {weight_metrics!r}")
    if feed not in ("device", "host"):
        raise ValueError(f"feed must be 'device' or 'host', got {feed!r}")
    if guard not in ("replay", "step"):
        raise ValueError(f"guard must be 'replay' or 'step', got {guard!r}")
    task = as_task(model)
    train_data, val_data = splits(data, host=True)
    n = jax.tree.leaves(train_data)[0].shape[0]
    batch_size = min(batch_size, n)
    if layout is not None and batch_size % layout.data_size:
        raise ValueError(
            f"batch size {batch_size} does not split over the layout's "
            f"{layout.data_size} data-parallel devices: use a multiple of {layout.data_size}"
        )
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    key = jax.random.PRNGKey(seed)
    state, shardings = init_state_on(layout, task, optimizer, key, params, tuner)
    val_data = _place(layout, val_data)
    if feed == "device":
        train_data = _place(layout, train_data)
    held = val_data if tuner is not None else None
    config = _StepConfig(
        task, optimizer, tuple(penalties), mask, layout, tuner, weight_metrics == "step", True
    )

    runners: dict[bool, _Runner] = {}  # unguarded and guarded, each built when first run

    def stretch(state: TrainState, guarded: bool) -> tuple[TrainState, list]:
        if guarded not in runners:
            runners[guarded] = _runner(
                config._replace(guard=guarded), shardings, batch_size, not scan
            )
        r = runners[guarded]
        if feed == "host":
            return r.from_host(state, train_data, done, length)
        metrics = []
        for k in [length] if scan else [1] * length:  # async dispatch: no host sync
            state, m = r(state, train_data, k, held)
            metrics.append(m)
        return state, metrics

    history: list[dict[str, float]] = []
    pending: list[Metrics] = []
    restored = checkpoints.load(state) if checkpoints is not None else None
    if restored is not None:
        if restored.step > total:
            raise ValueError(
                f"the checkpoint is at step {restored.step}, beyond this run's {epochs} "
                f"epochs ({total} steps): ask for at least {-(-restored.step // steps_per_epoch)}"
            )
        state, history = restored.state, restored.history
        pending = [restored.pending] if restored.pending else []
    note = dict(hyperparams) if hyperparams and restored is not None else None
    if hyperparams:
        state = state._replace(opt_state=set_hyperparams(state.opt_state, **hyperparams))
    best: tuple[float, TrainState | None, int] = (np.inf, None, len(history))
    bar = progress_bar(progress and jax.process_index() == 0, epochs, initial=len(history))
    done = int(state.step)
    for length in chunks(done, total, steps_per_epoch, checkpoints and checkpoints.every):
        if guard == "replay":
            state, metrics = replay_faulty(stretch, state)
        else:
            state, metrics = stretch(state, True)
        pending += metrics
        done += length
        if done % steps_per_epoch == 0:
            per_step = _host(pending)
            pending = []
            _check_hyperparams(per_step, done - steps_per_epoch)
            record = epoch_record(
                task, state, val_data, per_step, done // steps_per_epoch, mask=mask
            )
            if note:
                record, note = record | {"hyperparams_set": note}, None
            history.append(record)
            if on_epoch is not None:
                on_epoch(record, per_step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", val_loss=f"{record['val_loss']:.4f}")
            if patience is not None and record["val_loss"] < best[0]:
                best = (record["val_loss"], jax.tree.map(jnp.copy, state), len(history))
        if checkpoints is not None and (done % checkpoints.every == 0 or done == total):
            pending = [_host(pending)] if pending else []  # saved with the state
            checkpoints.save(state, history, pending[0] if pending else None)
        if patience is not None and len(history) - best[2] >= patience:
            break
    bar.close()
    if checkpoints is not None:
        checkpoints.wait()  # the last checkpoint is written and verified when fit returns
    stopped = patience is not None and len(history) - best[2] >= patience
    return _result(best[1] if best[1] is not None else state, history, stopped_early=stopped)


def init_state_on(
    layout: Layout | None,
    model: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    params: Params = None,
    tuner: Tuner | None = None,
) -> tuple[TrainState, Any]:
    """[`init_state`][wdjax.lab.train.init_state] created where `layout` says, by
    `jit(init, out_shardings=...)`: no leaf is ever whole on one device. Returns the
    state and its shardings (None without a layout)."""
    init = functools.partial(init_state, model, optimizer, tuner=tuner)
    if layout is None:
        return init(key, params), None
    abstract = jax.eval_shape(init, key, params)
    shardings = layout.shardings(abstract, abstract.params)
    if params is not None:
        params = layout.put(params, layout.params(params))
    return jax.jit(init, out_shardings=shardings)(key, params), shardings


def _place(layout: Layout | None, data: Batch) -> Batch:
    """Data on the device (without a layout) or replicated over the layout's mesh."""
    if layout is None:
        return jax.tree.map(jnp.asarray, data)
    return layout.put(data, layout.replicated(data))


class _StepConfig(NamedTuple):
    """What `make_train_step` builds a `fit` step from."""

    task: Task
    optimizer: optax.GradientTransformation
    penalties: tuple[Penalty, ...]
    mask: Mask
    layout: Layout | None
    tuner: Tuner | None
    weight_metrics_each_step: bool
    guard: bool


def _runner(config: _StepConfig, shardings: Any, batch_size: int, unroll: bool) -> _Runner:
    """The `_Runner` for this configuration, shared by every `fit` call with the same
    (identical) task, optimizer, penalties, mask, layout and tuner, the same state
    shardings and batch size: a second such call compiles nothing. A configuration
    that cannot be hashed (a mask given as a pytree) gets a runner of its own."""
    leaves, treedef = jax.tree.flatten(shardings)
    key = (config, tuple(leaves), treedef, batch_size, unroll)
    try:
        hash(key)
    except TypeError:
        return _new_runner(config, shardings, batch_size, unroll)
    return _cached_runner(key)


def _new_runner(config: _StepConfig, shardings: Any, batch_size: int, unroll: bool) -> _Runner:
    c = config
    step = make_train_step(
        c.task, c.optimizer, penalties=c.penalties, mask=c.mask, layout=c.layout,
        tuner=c.tuner, weight_metrics_each_step=c.weight_metrics_each_step, guard=c.guard,
    )  # fmt: skip
    return _Runner(step, shardings, c.layout, batch_size, unroll)


@functools.lru_cache(maxsize=16)
def _cached_runner(key: tuple) -> _Runner:
    config, leaves, treedef, batch_size, unroll = key
    return _new_runner(config, jax.tree.unflatten(treedef, leaves), batch_size, unroll)


class _Runner:
    """The jitted stretches of `fit`: `run(state, data, length)` scans `length` steps
    over device-resident data; `from_host` feeds host rows one step at a time. With a
    layout, each is jitted with its shardings (state in and out, replicated data and
    metrics, split batches) and donates the state."""

    def __init__(
        self, step: Callable, shardings: Any, layout: Layout | None, batch_size: int, unroll: bool
    ) -> None:
        self.step, self.layout, self.batch_size, self.unroll = step, layout, batch_size, unroll
        self.kwargs: dict[str, Any] = {"donate_argnums": 0}
        if layout is not None:
            self.kwargs["out_shardings"] = (shardings, layout.replicated())
        self.shardings = shardings
        self._jitted: dict[Any, Callable] = {}

    def _jit(self, key: Any, fn: Callable, data_sharding: Any) -> Callable:
        if key not in self._jitted:
            kwargs = dict(self.kwargs)
            if self.layout is not None:
                kwargs["in_shardings"] = (self.shardings, data_sharding)
            self._jitted[key] = jax.jit(fn, compiler_options=compiler.options(), **kwargs)
        return self._jitted[key]

    def __call__(
        self, state: TrainState, data: Batch, length: int, held: Batch | None = None
    ) -> tuple[TrainState, Metrics]:
        def stretch(state: TrainState, both: tuple) -> tuple[TrainState, Metrics]:
            data, held = both
            return run_steps(
                self.step, state, data, self.batch_size, length, None, self.unroll, held
            )

        rep = None if self.layout is None else self.layout.replicated((data, held))
        return self._jit(("scan", length), stretch, rep)(state, (data, held))

    def from_host(
        self, state: TrainState, data: Batch, start: int, length: int
    ) -> tuple[TrainState, list[Metrics]]:
        """`length` steps from step `start`, each on a batch this process reads from
        host `data` (only its rows); the state and each step's metrics."""
        n = jax.tree.leaves(data)[0].shape[0]
        per_epoch = n // self.batch_size
        rng = np.asarray(jax.device_get(state.rng))
        idx = np.asarray(epoch_batches(jnp.asarray(rng), start // per_epoch, n, self.batch_size))
        layout = self.layout
        rows = slice(None) if layout is None else layout.local_rows(self.batch_size)
        one = self._jit("step", self.step, None if layout is None else layout.batch())
        metrics = []
        for s in range(start, start + length):
            local = jax.tree.map(lambda a, i=idx[s % per_epoch][rows]: np.asarray(a[i]), data)
            batch = jax.device_put(local) if layout is None else layout.feed(local, self.batch_size)
            state, m = one(state, batch)
            metrics.append(m)
        return state, metrics


def _host(pending: list[Metrics]) -> dict[str, list]:
    """Per-step metrics of several scans (device or host) as one dict of host lists."""
    return {
        k: np.concatenate([np.atleast_1d(np.asarray(m[k])) for m in pending]).tolist()
        for k in pending[0]
    }


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says at which step and why."""


def _check_hyperparams(per_step: dict[str, list], first_step: int) -> None:
    """Stop at the end of an epoch in which a schedule gave a negative or non-finite
    learning rate or weight decay (those steps were skipped, not applied)."""
    for name in ("learning_rate", "weight_decay", "decay_factor"):
        values = np.asarray(per_step.get(name, []), dtype=np.float64)
        if np.all(np.isnan(values)):  # the optimizer does not have it
            continue
        ok = np.isfinite(values) & (values >= 0) & ((values < 1) | (name != "decay_factor"))
        bad = np.flatnonzero(~ok)
        if bad.size:
            i = int(bad[0])
            rule = "below 1" if name == "decay_factor" else "finite and >= 0"
            raise TrainingError(
                f"at step {first_step + i} the {name.replace('_', ' ')} was {values[i]:g}, "
                f"it must be {rule} ({bad.size} step(s) of this epoch were skipped, "
                "not applied)"
            )


def _result(state: TrainState, history: list[dict], stopped_early: bool = False) -> FitResult:
    last = history[-1] if history else {}
    prev = history[-2] if len(history) > 1 else {"skipped": 0.0, "step": 0}
    steps = last["step"] - prev["step"] if history else 0
    every_step_skipped = bool(history) and last["skipped"] - prev["skipped"] >= steps > 0
    diverged = bool(history) and not (np.isfinite(last["loss"]) and np.isfinite(last["val_loss"]))
    diverged = diverged or every_step_skipped
    return FitResult(state, history, stopped_early, diverged)


# Epoch records hold the mean over the epoch's steps, except these: their last value.
LAST = (
    "learning_rate",
    "weight_decay",
    "decay_factor",
    "skipped",
    "weight_norm",
    "weight_norm_decayed",
    "weight_norm_other",
    "zero_fraction",
)


@functools.partial(jax.jit, static_argnums=1)
def _weight_metrics_now(params: Params, decayed: tuple[bool, ...]) -> Metrics:
    return weight_metrics(params, decayed)


def epoch_record(
    model: Task | Any,
    state: TrainState,
    val: Any,
    per_step: dict,
    epoch: int,
    mask: Mask | None = None,
) -> dict[str, float]:
    """One epoch's history record: step-metric means (last values for
    [`LAST`][wdjax.lab.train.LAST]) and the validation metrics as `val_<name>`. `val`:
    arrays, or a Dataset (its val split). With a `mask`, the weight metrics of the
    state's params (the last step's values, when the steps did not record them)."""
    val = val.arrays("val") if hasattr(val, "arrays") else val
    scores = evaluate(model, state.params, state.model_state, val)
    means = {k: float(np.mean(v)) for k, v in per_step.items()}
    last = {k: float(per_step[k][-1]) for k in LAST if k in per_step}
    if mask is not None and "weight_norm" not in per_step:
        decayed = tuple(masks.resolve(state.params, mask))
        now = jax.device_get(_weight_metrics_now(state.params, decayed))
        last |= {k: float(v) for k, v in now.items()}
    return {
        "epoch": epoch,
        "step": int(state.step),
        **means,
        **last,
        **{f"val_{k}": v for k, v in scores.items()},
    }
