"""A pure, jit-compiled train step and a fit loop with no per-step host round trip.

``make_train_step(model, optimizer)`` gives ``step(state, batch) -> (state, metrics)``:

    (L, aux), g = value_and_grad(data_loss + Σ penalties)(params)
    u, opt_state = optimizer.update(g, opt_state, params);  params ← params + u

skipping (and counting, never applying) steps whose gradients are not finite.
:func:`fit` runs whole epochs, or the stretch up to the next checkpoint, as one
``lax.scan``; the batch order and dropout keys are pure functions of the step, so
resuming from a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import masks
from wdjax.penalties import Penalty, regularized

Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    """Everything a run carries; a pytree, so it jits, vmaps and checkpoints."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array
    skipped: jax.Array  # steps dropped for non-finite gradients


def init_state(
    model: Any, optimizer: optax.GradientTransformation, key: jax.Array, params: Any = None
) -> TrainState:
    """Initialize params from ``key`` (or start from given ``params``, e.g. to fine-tune)
    and the optimizer state from the params."""
    init_key, run_key = jax.random.split(key)
    fresh, model_state = model.init(init_key)
    params = (
        fresh if params is None else jax.tree.map(jnp.array, params)
    )  # a copy: state is donated
    step, skipped = (
        jnp.zeros([], jnp.int32),
        jnp.zeros([], jnp.int32),
    )  # distinct buffers: state is donated
    return TrainState(step, params, optimizer.init(params), model_state, run_key, skipped)


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def _hyperparam(opt_state: Any, name: str) -> jax.Array:
    """The current value of an injected hyperparameter (NaN if the optimizer has none)."""
    injected = jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
    values = [s.hyperparams[name] for s in injected if name in getattr(s, "hyperparams", {})]
    return jnp.asarray(values[0] if values else jnp.nan, jnp.float32)


def _sq_norm(leaves: Sequence[jax.Array]) -> jax.Array:
    return sum(
        (jnp.sum(jnp.square(w.astype(jnp.float32))) for w in leaves), jnp.zeros([], jnp.float32)
    )


def weight_metrics(params: Any, decayed: Sequence[bool]) -> Metrics:
    """Global and per-group (decayed / not decayed) weight norms, fraction of exact zeros."""
    floats = [(w, d) for w, d in zip(jax.tree.leaves(params), decayed) if masks.is_float(w)]
    size = sum(w.size for w, _ in floats)
    zeros = sum(
        (jnp.sum((w == 0).astype(jnp.float32)) for w, _ in floats), jnp.zeros([], jnp.float32)
    )
    on = _sq_norm([w for w, d in floats if d])
    off = _sq_norm([w for w, d in floats if not d])
    return {
        "weight_norm": jnp.sqrt(on + off),
        "weight_norm_decayed": jnp.sqrt(on),
        "weight_norm_other": jnp.sqrt(off),
        "zero_fraction": zeros / max(size, 1),
    }


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    penalties: Sequence[Penalty] = (),
    mask: Any = masks.DEFAULT,
) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """A pure ``step(state, {"x", "y"}) -> (state, metrics)`` (not jitted: jit it,
    scan it or vmap it; :func:`fit` does all three as needed).

    Metrics: ``loss`` (data loss), ``accuracy``, each penalty by name, ``grad_norm``,
    weight norms (global and for the ``mask``'s decayed / other groups),
    ``zero_fraction``, ``learning_rate`` and ``weight_decay`` (NaN if the optimizer
    does not expose them) and ``skipped``."""

    def data_loss(params, model_state, x, y, rng):
        logits, new_model_state = model.apply(params, model_state, x, train=True, rng=rng)
        return _cross_entropy(logits, y), (logits, new_model_state)

    objective = regularized(data_loss, *penalties, has_aux=True)

    def apply(operand: tuple) -> tuple:
        params, opt_state, grads, model_state, _ = operand
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, model_state

    def skip(operand: tuple) -> tuple:
        params, opt_state, _, _, old_model_state = operand
        return params, opt_state, old_model_state

    def step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)
        (total, aux), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.model_state, batch["x"], batch["y"], rng
        )
        logits, model_state = aux.pop("aux")
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(total)
        # a cond, not a select over the new and old states: XLA then updates in place
        params, opt_state, model_state = jax.lax.cond(
            ok, apply, skip, (state.params, state.opt_state, grads, model_state, state.model_state)
        )
        new_state = TrainState(
            state.step + 1,
            params,
            opt_state,
            model_state,
            state.rng,
            state.skipped + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": aux.pop("data_loss"),
            **aux,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
            "grad_norm": grad_norm,
            **weight_metrics(new_state.params, masks.resolve(new_state.params, mask)),
            "learning_rate": _hyperparam(state.opt_state, "learning_rate"),
            "weight_decay": _hyperparam(state.opt_state, "weight_decay"),
            "skipped": new_state.skipped,
        }
        return new_state, metrics

    return step


def epoch_batches(rng: jax.Array, epoch: jax.Array, n: int, batch_size: int) -> jax.Array:
    """Indices ``(steps_per_epoch, batch_size)`` of one epoch: a permutation keyed
    by ``(rng, epoch)``; the remainder that does not fill a batch is dropped."""
    perm = jax.random.permutation(jax.random.fold_in(jax.random.split(rng)[0], epoch), n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


def run_steps(
    step: Callable,
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    batch_size: int,
    length: int,
    rows: jax.Array | None = None,
    unroll: bool = False,
) -> tuple[TrainState, Metrics]:
    """``length`` steps from ``state.step`` as one ``lax.scan``, all within one epoch.

    ``rows`` (optional) restricts training to those example indices (a fold), so
    vmapped members can train on different subsets of one copy of the data.
    ``unroll=True`` unrolls the scan (see :func:`fit` on convolutions on CPU)."""
    n = x.shape[0] if rows is None else rows.shape[0]
    steps_per_epoch = n // batch_size
    idx = epoch_batches(state.rng, state.step // steps_per_epoch, n, batch_size)
    idx = jax.lax.dynamic_slice_in_dim(idx, state.step % steps_per_epoch, length)
    if rows is not None:
        idx = rows[idx]

    def body(state, i):
        return step(state, {"x": x[i], "y": y[i]})

    return jax.lax.scan(body, state, idx, unroll=unroll)


def evaluate(
    model: Any, params: Any, model_state: Any, x: Any, y: Any, batch_size: int = 2048
) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy over ``(x, y)`` in eval mode."""
    total_loss, correct = 0.0, 0
    for s in range(0, len(x), batch_size):
        loss_sum, hits = _eval_batch(
            model, params, model_state, x[s : s + batch_size], y[s : s + batch_size]
        )
        total_loss, correct = total_loss + loss_sum, correct + hits
    total_loss, correct = jax.device_get((total_loss, correct))
    return {"loss": float(total_loss) / len(x), "accuracy": float(correct) / len(x)}


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(model, params, model_state, x, y):
    logits, _ = model.apply(params, model_state, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == y)


def chunks(start: int, total: int, steps_per_epoch: int, every: int | None) -> Iterator[int]:
    """Lengths of the scans from ``start`` to ``total``: each ends at an epoch end,
    a multiple of ``every`` (checkpoints) or ``total``."""
    s = start
    while s < total:
        end = min(total, (s // steps_per_epoch + 1) * steps_per_epoch)
        if every:
            end = min(end, (s // every + 1) * every)
        yield end - s
        s = end


@dataclasses.dataclass
class FitResult:
    state: TrainState  # final (or, with early stopping, best) state
    history: list[dict[str, float]]  # one record per epoch
    stopped_early: bool = False


def fit(
    model: Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    penalties: Sequence[Penalty] = (),
    mask: Any = masks.DEFAULT,
    patience: int | None = None,
    checkpoints: Any = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float], list[dict]], None] | None = None,
    params: Any = None,
    scan: bool = True,
) -> FitResult:
    """Train on ``data`` (a :class:`wdjax.data.Dataset`) for ``epochs``.

    Each epoch (or stretch up to a checkpoint) is one jit-compiled, buffer-donating
    ``lax.scan`` over device-resident data. ``patience``: stop when the validation
    loss has not improved for that many epochs and keep the best state.
    ``checkpoints``: a :class:`wdjax.checkpoint.Checkpointer`; training resumes from
    its latest checkpoint, if any. ``on_epoch(record, step_metrics)`` sees each
    epoch's record and its per-step metrics (as host lists). ``params``: start from
    these instead of a fresh init (fine-tuning).

    ``scan=False`` dispatches the steps one by one (asynchronously: still no host round
    trip per step) instead of one ``lax.scan`` per stretch: for models whose backward
    pass XLA:CPU runs slowly inside a loop, such as plain ``lax`` convolutions
    (jax-ml/jax#12868; the reference CNN avoids this with :mod:`wdjax.ops`)."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    batch_size = min(batch_size, x.shape[0])
    steps_per_epoch = x.shape[0] // batch_size
    total = epochs * steps_per_epoch
    step = make_train_step(model, optimizer, penalties=penalties, mask=mask)
    run = jax.jit(run_steps, static_argnums=(0, 4, 5, 7), donate_argnums=1)

    state = init_state(model, optimizer, jax.random.PRNGKey(seed), params)
    history: list[dict[str, float]] = []
    if checkpoints is not None:
        state, history = checkpoints.restore(state, history)
    one_by_one = not scan
    best: tuple[float, TrainState | None, int] = (np.inf, None, len(history))
    bar = progress_bar(progress, epochs, initial=len(history))
    pending: list[Metrics] = []
    done = int(state.step)
    for length in chunks(done, total, steps_per_epoch, checkpoints and checkpoints.every):
        for n in (
            [1] * length if one_by_one else [length]
        ):  # async dispatch either way: no host sync
            state, metrics = run(step, state, x, y, batch_size, n, None, one_by_one)
            pending.append(metrics)
        done += length
        if done % steps_per_epoch == 0:
            per_step = {
                k: np.concatenate([np.asarray(m[k]) for m in pending]).tolist() for k in pending[0]
            }
            pending = []
            record = epoch_record(model, state, data, per_step, done // steps_per_epoch)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record, per_step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", val_acc=f"{record['val_accuracy']:.3f}")
            if patience is not None and record["val_loss"] < best[0]:
                best = (
                    record["val_loss"],
                    jax.tree.map(jnp.copy, state),
                    len(history),
                )  # state is donated next
        if checkpoints is not None and (done % checkpoints.every == 0 or done == total):
            checkpoints.save(state, history)
        if patience is not None and len(history) - best[2] >= patience:
            bar.close()
            return FitResult(best[1], history, stopped_early=True)
    bar.close()
    return FitResult(best[1] if best[1] is not None else state, history)


# Epoch records hold the mean over the epoch's steps, except these: their last value.
_LAST = (
    "learning_rate",
    "weight_decay",
    "skipped",
    "weight_norm",
    "weight_norm_decayed",
    "weight_norm_other",
    "zero_fraction",
)


def epoch_record(
    model: Any, state: TrainState, data: Any, per_step: dict, epoch: int
) -> dict[str, float]:
    """One epoch's history record: step-metric means (last values for :data:`_LAST`) and validation."""
    val = evaluate(model, state.params, state.model_state, data.x_val, data.y_val)
    means = {k: float(np.mean(v)) for k, v in per_step.items()}
    last = {k: float(per_step[k][-1]) for k in _LAST}
    return {
        "epoch": epoch,
        "step": int(state.step),
        **means,
        **last,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
    }


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
