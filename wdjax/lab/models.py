"""Reference Flax NNX models (MLP, CNN) behind a pure functional `init`/`apply` face."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from wdjax.lab import ops

Params = dict[str, Any]
ModelState = dict[str, Any]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
}


def _check_dropout(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {rate}")


class _MLP(nnx.Module):
    """Flatten -> [Dense -> (BatchNorm) -> act -> (Dropout)] * len(widths) -> Dense head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        widths: tuple[int, ...],
        activation: str,
        dropout: float,
        batch_norm: bool,
        rngs: nnx.Rngs,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        _check_dropout(dropout)
        self.depth = len(widths)
        self.activation = activation
        self.batch_norm = batch_norm
        features = math.prod(input_shape)
        for i, width in enumerate(widths):
            setattr(self, f"dense{i}", nnx.Linear(features, width, rngs=rngs))
            if batch_norm:
                setattr(self, f"norm{i}", nnx.BatchNorm(width, rngs=rngs))
            features = width
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = getattr(self, f"dense{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"norm{i}")(x, use_running_average=not train)
            x = self.dropout(act(x), deterministic=not train, rngs=rngs)
        return self.head(x)


class _CNN(nnx.Module):
    """[Conv 3x3 -> (BatchNorm) -> relu -> maxpool 2x2] * len(channels) -> Dense -> relu
    -> (Dropout) -> Dense head. Convolutions and pooling use [`wdjax.lab.ops`][], whose
    backward passes stay fast inside `lax.scan` on CPU (same values and gradients)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: tuple[int, ...],
        dense: int,
        dropout: float,
        batch_norm: bool,
        rngs: nnx.Rngs,
    ) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs input_shape (height, width, channels), got {input_shape}")
        _check_dropout(dropout)
        height, width, features = input_shape
        if min(height, width) < 2 ** len(channels):
            raise ValueError(
                f"input_shape {input_shape} too small for {len(channels)} 2x2 max-pools"
            )
        self.depth = len(channels)
        self.batch_norm = batch_norm
        for i, out in enumerate(channels, start=1):
            setattr(
                self,
                f"conv{i}",
                nnx.Conv(
                    features,
                    out,
                    (3, 3),
                    padding="SAME",
                    conv_general_dilated=ops.conv_general_dilated,
                    rngs=rngs,
                ),
            )
            if batch_norm:
                setattr(self, f"norm{i}", nnx.BatchNorm(out, rngs=rngs))
            features, height, width = out, height // 2, width // 2
        self.dense1 = nnx.Linear(height * width * features, dense, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"norm{i}")(x, use_running_average=not train)
            x = ops.max_pool_2x2(jax.nn.relu(x))
        x = jax.nn.relu(self.dense1(x.reshape(x.shape[0], -1)))
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        return self.head(x)


@dataclass(frozen=True)
class Entry:
    """A registered model: its factory (whose keyword arguments are the model's config)
    and the `nnx.Module` class it builds."""

    factory: Callable[..., Model]
    module: type[nnx.Module]


REGISTRY: dict[str, Entry] = {}  # filled by @register; the one list of models


def register(name: str, module: type[nnx.Module]) -> Callable:
    """Register a factory `f(*, input_shape, num_classes, **config) -> Model` under
    `name`, building `module`: the one step that adds a model to the lab and CLI."""

    def add(factory: Callable[..., Model]) -> Callable[..., Model]:
        REGISTRY[name] = Entry(factory, module)
        return factory

    return add


def _to_state(template: nnx.State, pure: dict[str, Any], what: str) -> nnx.State:
    """Fill a copy of the abstract `template` State with the arrays of a pure dict."""
    slots = dict(nnx.to_flat_state(template))
    values = traverse_util.flatten_dict(pure)
    if set(values) != set(slots):
        missing = sorted("/".join(map(str, k)) for k in set(slots) - set(values))
        extra = sorted("/".join(map(str, k)) for k in set(values) - set(slots))
        raise ValueError(f"{what} do not match the model: missing {missing}, unexpected {extra}")
    for path, slot in slots.items():
        if jnp.shape(values[path]) != slot.shape:
            raise ValueError(
                f"{what} {'/'.join(path)} has shape {jnp.shape(values[path])}, "
                f"expected {slot.shape}"
            )
    return nnx.from_flat_state({p: s.replace(values[p]) for p, s in slots.items()})


@dataclass(frozen=True)
class Model:
    """A reference model as two pure functions over plain nested dicts of arrays.

    Equality and hashing use `name`, `input_shape`, `num_classes` and `config` only, so
    a Model can be a static argument (or closure constant) of a jitted function.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    config: tuple[tuple[str, Any], ...] = ()
    _graphdef: nnx.GraphDef = field(init=False, repr=False, compare=False)
    _params: nnx.State = field(init=False, repr=False, compare=False)
    _model_state: nnx.State = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in REGISTRY:
            raise ValueError(f"unknown model {self.name!r}; valid: {', '.join(REGISTRY)}")
        abstract = nnx.eval_shape(lambda: self._module(nnx.Rngs(params=0)))
        graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
        object.__setattr__(self, "_graphdef", graphdef)
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_model_state", model_state)

    def _module(self, rngs: nnx.Rngs) -> nnx.Module:
        return REGISTRY[self.name].module(
            self.input_shape, self.num_classes, rngs=rngs, **dict(self.config)
        )

    def init(self, key: jax.Array) -> tuple[Params, ModelState]:
        """Fresh `(params, model_state)`: Param leaves, and the rest (batch stats, or {})."""
        _, params, model_state = nnx.split(self._module(nnx.Rngs(params=key)), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)

    def apply(
        self,
        params: Params,
        model_state: ModelState,
        x: jax.Array,
        *,
        train: bool,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, ModelState]:
        """float32 logits for a batch `x` of shape `(batch, *input_shape)`, and the new
        model_state (batch stats updated only when `train`). `rng` drives dropout and is
        required when `train` and dropout > 0. The layers compute in the params' dtype
        (bfloat16 params: a bfloat16 forward pass; see [`wdjax.lab.tasks.in_dtype`][])."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.name} expects inputs of shape (batch, *{self.input_shape}), got {x.shape}"
            )
        rate = dict(self.config).get("dropout", 0.0)
        if train and rate > 0 and rng is None:
            raise ValueError(f"{self.name} has dropout={rate}: apply(train=True) needs rng")
        module = nnx.merge(
            self._graphdef,
            _to_state(self._params, params, "params"),
            _to_state(self._model_state, model_state, "model_state"),
        )
        rngs = nnx.Rngs(dropout=rng) if rng is not None else None
        dtype = jnp.result_type(*jax.tree.leaves(params), jnp.float16)  # at least 16 bits
        logits = module(jnp.asarray(x, dtype), train=train, rngs=rngs)
        if train:
            _, _, new_state = nnx.split(module, nnx.Param, ...)
            model_state = nnx.to_pure_dict(new_state)
        return logits.astype(jnp.float32), model_state


@register("mlp", _MLP)
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    widths: tuple[int, ...] = (256, 256),
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> Model:
    """Multi-layer perceptron on the flattened input."""
    config = {
        "widths": tuple(widths),
        "activation": activation,
        "dropout": float(dropout),
        "batch_norm": bool(batch_norm),
    }
    return Model("mlp", tuple(input_shape), num_classes, tuple(config.items()))


@register("cnn", _CNN)
def cnn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    channels: tuple[int, ...] = (32, 64),
    dense: int = 64,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> Model:
    """The classic weight-decay CNN (defaults: conv32-pool-conv64-pool-dense64-head)."""
    config = {
        "channels": tuple(channels),
        "dense": int(dense),
        "dropout": float(dropout),
        "batch_norm": bool(batch_norm),
    }
    return Model("cnn", tuple(input_shape), num_classes, tuple(config.items()))


MODELS = tuple(REGISTRY)


def config_names(name: str) -> list[str]:
    """The config keywords of model `name`: its factory's, less the data's shapes."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(REGISTRY)}")
    params = inspect.signature(REGISTRY[name].factory).parameters
    return [p for p in params if p not in ("input_shape", "num_classes")]


def create(
    name: str, *, input_shape: tuple[int, ...], num_classes: int = 10, **config: Any
) -> Model:
    """Build model `name` (a key of
    [`REGISTRY`][wdjax.lab.models.REGISTRY]) with its factory's
    keyword `config`; unknown keys raise `ValueError` listing the
    valid ones."""
    valid = config_names(name)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"unknown config for {name}: {unknown}; valid: {', '.join(valid)}")
    factory = REGISTRY[name].factory
    return factory(input_shape=input_shape, num_classes=num_classes, **config)
