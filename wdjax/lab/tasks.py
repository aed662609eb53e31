"""A model and its loss as the train loop and the sweep engine see them: a
[`Task`][wdjax.lab.tasks.Task].

A task is three pure functions over a *batch*, a pytree of arrays whose leading axis is
the example axis (`{"x": images, "y": labels}` for the reference models):

```text
init(key)                               -> (params, model_state)
loss(params, model_state, batch, rng)   -> (loss, (model_state, metrics))
per_example(params, model_state, batch) -> {name: values of shape (batch,)}
```

`loss` is the training objective (a batch mean) in train mode; `metrics` are batch
means reported each step. `per_example` runs in eval mode;
[`evaluate`][wdjax.lab.tasks.evaluate] averages it over a data set, which is how
every validation and test figure in the lab is made.

Build one with [`task`][wdjax.lab.tasks.task] from your own `init(key) -> params` and
`loss(params, batch) -> scalar` (Flax, Equinox or plain JAX), or with
[`classifier`][wdjax.lab.tasks.classifier] from a reference [`wdjax.lab.models.Model`][].
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wdjax.lab.models import Model
from wdjax.types import Params

Batch = Any  # a pytree of arrays with a leading example axis
Metrics = dict[str, jax.Array]
ModelState = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """What [`wdjax.lab.train.fit`][] and [`wdjax.sweep`][wdjax.lab.sweeps.sweep] need of a model.

    Hashed by identity, so a task can be a static argument of a jitted function:
    build it once and reuse it, and compiled programs are reused with it."""

    init: Callable[[jax.Array], tuple[Params, ModelState]]
    loss: Callable[[Params, ModelState, Batch, jax.Array], tuple[jax.Array, tuple]]
    per_example: Callable[[Params, ModelState, Batch], Metrics]
    name: str = "task"


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


@functools.lru_cache(maxsize=64)
def classifier(model: Model) -> Task:
    """Cross-entropy classification with a reference model on `{"x", "y"}` batches;
    metrics `loss` and `accuracy`. Cached, so one model gives one task."""

    def loss(params: Params, model_state: ModelState, batch: Batch, rng: jax.Array) -> tuple:
        logits, model_state = model.apply(params, model_state, batch["x"], train=True, rng=rng)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
        return _cross_entropy(logits, batch["y"]).mean(), (model_state, {"accuracy": accuracy})

    def per_example(params: Params, model_state: ModelState, batch: Batch) -> Metrics:
        logits, _ = model.apply(params, model_state, batch["x"], train=False)
        hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return {"loss": _cross_entropy(logits, batch["y"]), "accuracy": hits}

    return Task(model.init, loss, per_example, model.name)


def task(
    init: Callable[[jax.Array], Params],
    loss: Callable[..., Any],
    *,
    metrics: Callable[[Params, Batch], Metrics] | None = None,
    name: str = "custom",
) -> Task:
    """A [`Task`][wdjax.lab.tasks.Task] from your own functions, for models without mutable state.

    `init(key) -> params`. `loss(params, batch) -> scalar` or `(scalar, {name:
    scalar})`; a third parameter, if `loss` has one, receives a fresh PRNG key each
    training step (for dropout) and a fixed one in evaluation. `metrics(params, batch)
    -> {name: (batch,) array}` gives the validation metrics; by default, the loss of
    each example on its own."""
    takes_rng = len(inspect.signature(loss).parameters) >= 3

    def call(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        out = loss(params, batch, rng) if takes_rng else loss(params, batch)
        return out if isinstance(out, tuple) else (out, {})

    def train_loss(params: Params, model_state: ModelState, batch: Batch, rng: jax.Array):
        value, aux = call(params, batch, rng)
        return value, (model_state, aux)

    def per_example(params: Params, model_state: ModelState, batch: Batch) -> Metrics:
        if metrics is not None:
            return metrics(params, batch)
        one = jax.tree.map(lambda a: a[:, None], batch)  # each example as a batch of one
        key = jax.random.PRNGKey(0)  # evaluation is deterministic
        return {"loss": jax.vmap(lambda b: call(params, b, key)[0])(one)}

    return Task(lambda key: (init(key), {}), train_loss, per_example, name)


@functools.lru_cache(maxsize=64)
def in_dtype(task: Task, dtype: Any) -> Task:
    """`task` computed in `dtype` (mixed precision): its loss and metrics see params and
    float batch leaves cast to `dtype`, and return float32 values and model state in its
    own dtypes, so gradients, optimizer state and master params stay float32. Cached."""
    dtype = jnp.dtype(dtype)

    def cast(tree: Any) -> Any:
        low = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        return jax.tree.map(low, tree)

    def back(tree: Any, like: Any) -> Any:
        return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)

    def loss(params: Params, model_state: ModelState, batch: Batch, rng: jax.Array) -> tuple:
        value, (new_state, metrics) = task.loss(cast(params), model_state, cast(batch), rng)
        f32 = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        return value.astype(jnp.float32), (back(new_state, model_state), f32)

    def per_example(params: Params, model_state: ModelState, batch: Batch) -> Metrics:
        values = task.per_example(cast(params), model_state, cast(batch))
        return {k: v.astype(jnp.float32) for k, v in values.items()}

    return Task(task.init, loss, per_example, f"{task.name}@{dtype.name}")


def as_task(model: Model | Task) -> Task:
    """A [`Task`][wdjax.lab.tasks.Task] as is; a reference [`Model`][wdjax.lab.models.Model] as its
    [`classifier`][wdjax.lab.tasks.classifier]."""
    if isinstance(model, Task):
        return model
    if isinstance(model, Model):
        return classifier(model)
    raise TypeError(f"expected a wdjax.lab Task or Model, got {type(model).__name__}")


def evaluate(
    task: Task,
    params: Params,
    model_state: ModelState,
    data: Batch,
    rows: jax.Array | None = None,
    batch_size: int = 1024,
) -> Metrics:
    """The mean of `task.per_example` over `data` (or its `rows`), in eval mode:
    one `lax.scan` over batches, the last one padded and masked out. Pure and
    jittable (`task` and `batch_size` static); vmaps over members."""
    n_all = jax.tree.leaves(data)[0].shape[0]
    rows = jnp.arange(n_all) if rows is None else rows
    n = rows.shape[0]
    batch_size = max(1, min(batch_size, n))
    padded = -(-n // batch_size) * batch_size
    idx = jnp.pad(rows, (0, padded - n)).reshape(-1, batch_size)
    valid = (jnp.arange(padded) < n).reshape(-1, batch_size)
    shapes = jax.eval_shape(
        lambda: task.per_example(params, model_state, jax.tree.map(lambda a: a[idx[0]], data))
    )

    def body(total: Metrics, batch: tuple[jax.Array, jax.Array]) -> tuple[Metrics, None]:
        i, ok = batch
        values = task.per_example(params, model_state, jax.tree.map(lambda a: a[i], data))
        return {k: total[k] + jnp.sum(jnp.where(ok, v, 0.0)) for k, v in values.items()}, None

    zeros = {k: jnp.zeros([], jnp.float32) for k in shapes}
    total, _ = jax.lax.scan(body, zeros, (idx, valid))
    return {k: v / n for k, v in total.items()}
