"""Ready-made optimizers: thin `optax.chain`s with the decay in the right place.

| optimizer | chain                               | PyTorch equivalent                |
| --------- | ----------------------------------- | --------------------------------- |
| `adamw`   | adam → −η → decay `u ← u − c_t·λ·w` | `AdamW(weight_decay=λ)`           |
| `adam_l2` | `g + λ·w` → adam → −η               | `Adam(weight_decay=λ)`            |
| `sgdw`    | momentum → −η → decoupled decay     | (SGDW, Loshchilov & Hutter)       |
| `sgd_l2`  | `g + λ·w` → momentum → −η           | `SGD(weight_decay=λ, momentum=μ)` |
| `lionw`   | lion → −η → decoupled decay         | (Lion paper)                      |

Each takes `mask` (default: [`wdjax.masks.default`][], kernels only — biases,
normalization parameters and embeddings are not decayed), `l1` (adds
[`wdjax.l1_proximal`][wdjax.transforms.l1_proximal] last; `None` leaves it
out) and, for the decoupled ones, `lr_coupling` and `cautious` (see
[`wdjax.decoupled_weight_decay`][wdjax.transforms.decoupled_weight_decay]).

`weight_decay` and `l1` may also be per-group [`wdjax.rates`][wdjax.groups.rates] (then they
are static). Scalar `learning_rate`, `weight_decay` and `l1` live in the optimizer
state as float32 hyperparameters (`optax.inject_hyperparams`), so they can be read and changed
without recompiling, and vmapped over for sweeps:

```python
state = wdjax.set_hyperparams(state, weight_decay=1e-3)   # no recompilation
```

The mask is bound before injection, so a callable mask is never mistaken for a
schedule (the trap of `optax.inject_hyperparams(optax.adamw)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wdjax import groups, masks
from wdjax.transforms import (
    _check_shapes,
    _decoupled,
    _l1_proximal,
    _l2_gradient,
    _validated,
    check_factor,
    multiplier,
)
from wdjax.types import Coupling, Mask, Rate, ScalarOrSchedule


def _descend(learning_rate: jax.Array) -> optax.GradientTransformation:
    """`u ← −η·u` in each update's own dtype: the injected η is float32, and a bf16
    update stays bf16 (as with `optax.adamw`'s weakly typed Python-float η)."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda u: u * (-learning_rate).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _float16_in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` in float32 for float16 leaves, its state included: Adam's ε = 1e-8
    underflows to 0 in float16, and a zero gradient then gives 0/0 = NaN. Other dtypes
    pass through untouched; updates come back in their own dtype."""

    def up(tree: Any) -> Any:
        return jax.tree.map(
            lambda x: x.astype(jnp.float32) if getattr(x, "dtype", None) == jnp.float16 else x,
            tree,
        )

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        new, state = inner.update(up(updates), state, up(params))
        return jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates), state

    return optax.GradientTransformation(lambda params: inner.init(up(params)), update)


def _fitting_updates() -> optax.GradientTransformation:
    """First in every optimizer: updates must have the params' structure and shapes
    (checked when traced), before any moment could broadcast them silently."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if updates is not None and params is not None:
            leaves, treedef = masks.flatten(params)
            _check_shapes(updates, leaves, treedef)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _betas(**values: float) -> None:
    """Moment decays in [0, 1), ε ≥ 0: checked once, here, as the optimizer is built."""
    for name, value in values.items():
        groups.check_rate(value, name)
        if name.startswith("b") and not value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _build(
    direction: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate,
    *,
    coupled: bool,
    mask: Mask,
    l1: Rate | None,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The one place an optimizer's arguments are checked; the chain below is rebuilt
    by `inject_hyperparams` at every trace and checks nothing."""
    groups.check_rate_arg(weight_decay, "weight_decay")  # named in the error, not "rate"
    _validated(weight_decay, mask, learning_rate=learning_rate, max_learning_rate=max_learning_rate)
    if l1 is not None:
        groups.check_rate_arg(l1, "l1")
    if not coupled:
        check_factor(weight_decay, multiplier(lr_coupling, learning_rate, max_learning_rate))

    def chain(
        learning_rate: Any, weight_decay: Any, l1: Any = None
    ) -> optax.GradientTransformation:
        parts = [_fitting_updates()]
        parts += [_l2_gradient(weight_decay, mask)] if coupled else []
        parts += [_float16_in_float32(direction), _descend(learning_rate)]
        if not coupled:
            parts.append(
                _decoupled(
                    weight_decay, mask, learning_rate, lr_coupling, max_learning_rate, cautious
                )
            )
        if l1 is not None:
            parts.append(_l1_proximal(l1, mask, learning_rate))
        return optax.chain(*parts)

    hyper = {"learning_rate": learning_rate, "weight_decay": weight_decay}
    if l1 is not None:
        hyper["l1"] = l1
    return optax.inject_hyperparams(chain, hyperparam_dtype=jnp.float32)(**hyper)


def adamw(
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate = 1e-4,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    mask: Mask = masks.DEFAULT,
    l1: Rate | None = None,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamW: `u = −η_t·m̂/(√v̂ + ε) − c_t·λ·w` (`nesterov=True`: NAdamW). `b1`, `b2`,
    `eps`, `eps_root`, `mu_dtype` and `nesterov` as in `optax.adamw`."""
    _betas(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return _build(
        optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        learning_rate,
        weight_decay,
        coupled=False,
        mask=mask,
        l1=l1,
        lr_coupling=lr_coupling,
        max_learning_rate=max_learning_rate,
        cautious=cautious,
    )


def adam_l2(
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate = 1e-4,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    mask: Mask = masks.DEFAULT,
    l1: Rate | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam on `g + λ·w` (coupled L2): PyTorch `Adam(weight_decay=λ)`."""
    _betas(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return _build(
        optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        learning_rate,
        weight_decay,
        coupled=True,
        mask=mask,
        l1=l1,
    )


def _momentum(momentum: float, nesterov: bool, dtype: Any) -> optax.GradientTransformation:
    groups.check_rate(momentum, "momentum")
    if not momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return optax.trace(momentum, nesterov, dtype) if momentum else optax.identity()


def sgdw(
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate = 1e-4,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    mask: Mask = masks.DEFAULT,
    l1: Rate | None = None,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SGD with (heavy-ball or Nesterov) momentum and decoupled decay `u ← u − c_t·λ·w`."""
    return _build(
        _momentum(momentum, nesterov, accumulator_dtype),
        learning_rate,
        weight_decay,
        coupled=False,
        mask=mask,
        l1=l1,
        lr_coupling=lr_coupling,
        max_learning_rate=max_learning_rate,
        cautious=cautious,
    )


def sgd_l2(
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate = 1e-4,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    mask: Mask = masks.DEFAULT,
    l1: Rate | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGD on `g + λ·w`: PyTorch `SGD(weight_decay=λ, momentum=μ, nesterov=...)`."""
    return _build(
        _momentum(momentum, nesterov, accumulator_dtype),
        learning_rate,
        weight_decay,
        coupled=True,
        mask=mask,
        l1=l1,
    )


def lionw(
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate = 1e-2,
    *,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    mask: Mask = masks.DEFAULT,
    l1: Rate | None = None,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Lion (sign of interpolated momentum) with decoupled decay, as in the Lion paper."""
    _betas(b1=b1, b2=b2)
    return _build(
        optax.scale_by_lion(b1, b2, mu_dtype),
        learning_rate,
        weight_decay,
        coupled=False,
        mask=mask,
        l1=l1,
        lr_coupling=lr_coupling,
        max_learning_rate=max_learning_rate,
        cautious=cautious,
    )


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
    """Return `opt_state` with injected hyperparameters (`weight_decay`,
    `learning_rate`, `l1`, or any other `optax.inject_hyperparams` put there) set to
    `values`, cast to the dtype of the values they replace. Pure: nothing is mutated.

    The pytree structure is kept exactly, wrappers included (the `OptArray` Variables
    of an `nnx.Optimizer`), so a jitted step sees the same types and does not recompile.
    A name the state does not hold raises `KeyError`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    found: set[str] = set()
    leaves = []
    for path, leaf in flat:
        name = _hyperparam_name(path)
        if name in values:
            found.add(name)
            dtype = getattr(leaf, "dtype", jnp.float32)
            leaf = jnp.asarray(values[name], dtype)
        leaves.append(leaf)
    missing = sorted(set(values) - found)
    if missing:
        raise KeyError(f"the optimizer state injects no hyperparameter {missing}")
    return jax.tree.unflatten(treedef, leaves)


def _hyperparam_name(path: tuple) -> str | None:
    """The name `k` if `path` runs through `...hyperparams[k]`, else None."""
    for here, there in zip(path, path[1:], strict=False):
        if getattr(here, "name", None) == "hyperparams" and hasattr(there, "key"):
            return there.key
    return None


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "adamw": adamw,
    "adam_l2": adam_l2,
    "sgdw": sgdw,
    "sgd_l2": sgd_l2,
    "lionw": lionw,
}


def create(
    name: str, learning_rate: ScalarOrSchedule, weight_decay: ScalarOrSchedule, **kwargs: Any
):
    """Build an optimizer by name (one of [`OPTIMIZERS`][wdjax.optimizers.OPTIMIZERS])."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](learning_rate, weight_decay, **kwargs)
