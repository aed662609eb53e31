"""Shared test helpers: param trees (linen dicts, ``nnx.State``, Equinox modules), a small
MLP and its training trajectory, hypothesis strategies for float trees, one-step helpers
and comparisons. Test modules import from here, never from each other."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import settings
from hypothesis import strategies as st

from wdjax import masks

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Hypothesis settings for the property tests: few examples, each one compiles.
PROPERTY = settings(max_examples=10, deadline=None)

# ------------------------------------------------------------------ comparisons


def f32(x: Any) -> np.ndarray:
    """``x`` as a float32 NumPy array (bfloat16 has no NumPy arithmetic)."""
    return np.asarray(x, np.float32)


def tol(dtype: Any) -> float:
    """A relative tolerance for arithmetic done in ``dtype``."""
    return {
        jnp.dtype(jnp.float32): 1e-5,
        jnp.dtype(jnp.float16): 2e-3,
        jnp.dtype(jnp.bfloat16): 2e-2,
    }[jnp.dtype(dtype)]


def float_leaves(tree: Any) -> list:
    """The floating-point leaves of ``tree`` (an optimizer state's moments and
    hyperparameters, not its step counts)."""
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


def bits(tree: Any) -> list[tuple]:
    """Dtype, shape and raw bytes of every leaf: equal lists mean equal bit for bit
    (``-0.0 != 0.0``, and NaNs compare by payload)."""
    return [(x.dtype, x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def max_rel_err(a: Any, b: Any) -> float:
    """max over steps (axis 0) and leaves of ``‖a_t − b_t‖_∞ / ‖b_t‖_∞``."""
    errs = jax.tree.map(
        lambda x, y: np.max(
            np.abs(f32(x) - f32(y)).reshape(len(x), -1).max(1)
            / np.abs(f32(y)).reshape(len(y), -1).max(1)
        ),
        a,
        b,
    )
    return float(max(jax.tree.leaves(errs)))


def selected(params: Any, mask: Any) -> set[str]:
    """The paths ``mask`` selects in ``params``."""
    chosen = masks.resolve(params, mask)
    return {p for (p, _), c in zip(masks.leaves_with_paths(params), chosen, strict=True) if c}


# ------------------------------------------------------------------ param trees


def randomize(tree: Any, seed: int = 0, scale: float = 1.0) -> Any:
    """``tree`` with every float leaf redrawn from a normal distribution (same shapes,
    dtypes and containers), so no leaf is all zeros or all ones."""
    rng = np.random.default_rng(seed)

    def draw(x: Any) -> Any:
        if not jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.floating):
            return x
        return jnp.asarray(scale * rng.normal(size=x.shape), x.dtype)

    return jax.tree.map(draw, tree)


def astype(tree: Any, dtype: Any) -> Any:
    """``tree`` with its float leaves cast to ``dtype``."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def like(tree: Any, seed: int = 1, scale: float = 1.0) -> Any:
    """Fresh random values with the structure, shapes and dtypes of ``tree``."""
    return randomize(tree, seed, scale)


# A linen-style params dict, with an integer leaf that must never be decayed.
MASK_PARAMS = {
    "Embed_0": {"embedding": jnp.ones((5, 3))},
    "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
    "step": jnp.array(3, jnp.int32),
}
MASK_PATHS = [
    "Dense_0/bias",
    "Dense_0/kernel",
    "Embed_0/embedding",
    "LayerNorm_0/bias",
    "LayerNorm_0/scale",
    "head/bias",
    "head/kernel",
    "step",
]


@functools.cache
def linen_params() -> dict:
    """The ``{"params": ...}`` dict of a Flax linen model (embedding, layer norm,
    two dense layers), with random values in every leaf."""
    from flax import linen

    class Net(linen.Module):
        @linen.compact
        def __call__(self, ids: jax.Array) -> jax.Array:
            h = linen.LayerNorm()(linen.Embed(10, 4)(ids))
            return linen.Dense(2, name="head")(jax.nn.relu(linen.Dense(6)(h)))

    params = Net().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    return randomize(params, seed=10)


@functools.cache
def nnx_state() -> Any:
    """The ``nnx.State`` of a Flax NNX model's ``nnx.Param``\\ s (dense, norm, head)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    return randomize(nnx.state(Net(nnx.Rngs(0)), nnx.Param), seed=11)


@functools.cache
def eqx_params() -> Any:
    """The inexact-array part of an Equinox MLP: an ``eqx.nn.MLP`` whose leaves are
    the weights and biases (and ``None`` elsewhere)."""
    import equinox as eqx

    mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    return randomize(eqx.filter(mlp, eqx.is_inexact_array), seed=12)


TREE_KINDS: dict[str, Callable[[], Any]] = {
    "linen": linen_params,
    "nnx": nnx_state,
    "equinox": eqx_params,
}

# A small two-layer tree with kernels and biases.
P = {
    "dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.array([1.0, -1.0])},
    "head": {"kernel": jnp.array([[2.0], [-4.0]]), "bias": jnp.array([0.25])},
}
ZEROS = jax.tree.map(jnp.zeros_like, P)
U = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype), P)


def one_step(tx: optax.GradientTransformation, updates: Any = U, params: Any = P) -> Any:
    """The updates of ``tx``'s first step."""
    return tx.update(updates, tx.init(params), params)[0]


def run_steps(
    tx: optax.GradientTransformation, grads: Any, params: Any, steps: int = 3
) -> tuple[Any, Any]:
    """``steps`` steps with the same ``grads``: ``(last updates, final params)``."""
    state = tx.init(params)
    updates = None
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return updates, params


# --------------------------------------------------------- an MLP and its training


def init_mlp(seed: int = 0, sizes: tuple[int, ...] = (4, 16, 16, 3)) -> dict:
    """Plain-pytree params of a small MLP: ``{"dense0": {"kernel", "bias"}, ...}``
    (NumPy draws: ``jax.random`` would compile at import, in every test process)."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"dense{i}"] = {
            "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.asarray(0.1 * rng.normal(size=b), jnp.float32),
        }
    return params


def mse(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    layers = [params[f"dense{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return jnp.mean((x @ layers[-1]["kernel"] + layers[-1]["bias"] - y) ** 2)


MLP0 = init_mlp(0)
_rng = np.random.default_rng(1)
BATCHES = (
    jnp.asarray(_rng.normal(size=(120, 8, 4)), jnp.float32),
    jnp.asarray(_rng.normal(size=(120, 8, 3)), jnp.float32),
)


def trajectory(
    tx: optax.GradientTransformation,
    loss: Callable[..., jax.Array] = mse,
    steps: int = 50,
    params: Any = MLP0,
    batches: Any = BATCHES,
) -> Any:
    """Params after each of ``steps`` steps on a fixed batch sequence (stacked on axis 0)."""

    @jax.jit
    def run(params, batches):
        def body(carry, batch):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p, *batch), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        return jax.lax.scan(body, (params, tx.init(params)), batches)[1]

    return run(params, jax.tree.map(lambda b: b[:steps], batches))


# ------------------------------------------------------------ hypothesis strategies


@st.composite
def float_trees(draw: Any, min_ndim: int = 0, dtypes: tuple = FLOAT_DTYPES) -> tuple:
    """A random pytree (nested dicts and lists, 1-9 leaves) of random float arrays,
    and a ``like(tree)`` function that draws fresh values of the same structure."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def leaf():
        shape = draw(st.lists(st.integers(1, 4), min_size=min_ndim, max_size=3))
        return jnp.asarray(rng.normal(size=shape), draw(st.sampled_from(dtypes)))

    def node(depth: int):
        if depth == 0 or draw(st.booleans()):
            return leaf()
        kids = [node(depth - 1) for _ in range(draw(st.integers(1, 3)))]
        return {f"k{i}": k for i, k in enumerate(kids)} if draw(st.booleans()) else kids

    tree = {"root": node(2)}

    def fresh(t):
        return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), t)

    return tree, fresh


@st.composite
def float_arrays(
    draw: Any,
    min_ndim: int = 1,
    max_ndim: int = 3,
    max_side: int = 5,
    scale: float = 2.0,
    shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """A float32 array (of ``shape``, or a random one) with finite values in
    ``[-scale, scale]``, exact zeros and repeats included (hypothesis' corner cases)."""
    if shape is None:
        sides = st.lists(st.integers(1, max_side), min_size=min_ndim, max_size=max_ndim)
        shape = tuple(draw(sides))
    size = int(np.prod(shape))
    values = draw(
        st.lists(st.floats(-scale, scale, allow_nan=False, width=32), min_size=size, max_size=size)
    )
    return np.asarray(values, np.float32).reshape(shape)


# ------------------------------------------------------------------ scale-out runs


# The sweep of the scale-out tests: 8 members, one per device of the simulated mesh.
SWEEP_GRID = {
    "weight_decay": [0.0, 1e-2, 1e-1, 1.0],
    "learning_rate": [3e-3, 1e-2],
    "epochs": 1,
    "batch_size": 64,
    "progress": False,
}


def scale_run() -> dict[str, Any]:
    """The run of the scale-out tests (in-process and in tests/scale_worker.py): the
    reference MLP on digits with ``wdjax.adamw`` + per-group rates + an L1 step, then
    ``max_norm``; 19 steps an epoch."""
    import wdjax
    from wdjax.lab import data, models

    digits = data.load("digits")
    model = models.create("mlp", input_shape=digits.input_shape, widths=(64, 32))
    rates = wdjax.rates({"*/kernel": 1e-2}, default=1e-3)
    optimizer = optax.chain(
        wdjax.adamw(3e-3, rates, mask=masks.ALL, l1=1e-4), wdjax.max_norm(2.0, "*/kernel")
    )
    return {
        "model": model,
        "optimizer": optimizer,
        "data": digits,
        "kwargs": {"batch_size": 64, "progress": False, "seed": 3},
    }
