"""Weight decay as Optax gradient transformations.

Optax's sign convention: a transformation outputs updates `u` that
`optax.apply_updates` adds, `w ← w + u`. Gradients enter as `g`; after the
optimizer's scaling, `u = −η_t · direction`.

| transform | rule | where in a chain |
|---|---|---|
| `add_l2_gradient(λ)` | `g ← g + λ·w` | before the optimizer |
| `decoupled_weight_decay(λ)` | `u ← u − c_t·λ·w` | after the optimizer |
| `decay_toward(w₀, λ)` | `u ← u − c_t·λ·(w − w₀)` | after the optimizer |
| `l1_proximal(λ, learning_rate=η)` | `w⁺ = w + u;  w⁺ ← sign(w⁺)·max(abs(w⁺) − η_t·λ, 0)` | last |
| `max_norm(c, axis=a)` | `w⁺ = w + u;  w⁺ ← w⁺·min(1, c/‖w⁺‖)` | last |

Every transform has the signature `(rate, mask=None, *, learning_rate=..., ...)`:
`rate` is a scalar, a schedule `step -> λ`, a traced value, a per-leaf pytree or
[`wdjax.rates`][wdjax.groups.rates] (see [`wdjax.groups`][]), `mask` selects leaves (see
[`wdjax.masks`][]). Masked-out and non-float leaves pass through bit for bit; a
Python `0` rate is the identity. Arithmetic is in float32 for low-precision leaves,
cast back to the update's dtype. Arguments are validated once, by the public factory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import groups, masks
from wdjax.groups import check_rate
from wdjax.types import COUPLINGS, Coupling, Mask, Params, Rate, ScalarOrSchedule, f32, sq

LeafStep = Callable[[jax.Array, jax.Array, Any, Any], jax.Array]  # (u, w, rate, w0) -> u


class DecayState(NamedTuple):
    """Step count (for schedules); for decoupled decay the largest per-step factor
    `c_t·λ` of the last update (`≥ 1` flips or zeroes weights: the lab's train step
    skips such a step and stops the run); for
    [`decay_toward`][wdjax.transforms.decay_toward] the anchor weights."""

    count: jax.Array
    anchor: Params = None
    factor: jax.Array | None = None


def _at(value: Any, count: jax.Array) -> Any:
    return value(count) if callable(value) else value


def _leafwise(
    rate: Any,
    mask: Any,
    make_step: Callable[[jax.Array], LeafStep],
    anchor: Params = None,
    check_init: Callable[[Params, list[Any]], None] | None = None,
    factor: Callable[[jax.Array, list[Any]], jax.Array] | None = None,
) -> optax.GradientTransformation:
    """A transformation that rewrites each selected leaf with `make_step(count)`.
    `rate` and `mask` were validated by the public factory; the mask's fit to the
    params is checked at `init`."""

    def init_fn(params: Params) -> DecayState:
        if anchor is not None:
            _aligned(params, anchor, "anchor")
        count = jnp.zeros([], jnp.int32)
        rates = groups.leaf_rates(params, _at(rate, count), mask)  # validates mask and rates now
        if check_init is not None:
            check_init(params, rates)
        zero = None if factor is None else jnp.zeros([], jnp.float32)
        return DecayState(count, jax.tree.map(_copy, anchor), zero)  # a copy: states are donated

    def update_fn(updates: Params, state: DecayState, params: Params | None = None):
        if params is None:
            raise ValueError(
                "wdjax transforms need the params: call update(updates, state, params)"
            )
        if updates is None:  # as Optax's add_decayed_weights: nothing to transform
            return None, state._replace(count=optax.safe_increment(state.count))
        leaves, treedef = masks.flatten(params)
        _check_shapes(updates, leaves, treedef)
        rates = groups.leaf_rates(params, _at(rate, state.count), mask)
        anchors = (
            _aligned(params, state.anchor, "anchor")
            if state.anchor is not None
            else [None] * len(leaves)
        )
        step = make_step(state.count)
        out = [
            u if r is None else step(u, w, r, w0)
            for u, w, r, w0 in zip(
                treedef.flatten_up_to(updates), leaves, rates, anchors, strict=True
            )
        ]
        used = None if factor is None else factor(state.count, rates)
        new_state = DecayState(optax.safe_increment(state.count), state.anchor, used)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _copy(x: Any) -> jax.Array:
    """A copy of `x` that keeps its `NamedSharding` also under `jit(init)`, where
    `x` is a closure constant that would otherwise land on one device."""
    out = jnp.array(x)
    if isinstance(x, jax.core.Tracer):
        return out
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        out = jax.lax.with_sharding_constraint(out, sharding)
    return out


def _check_shapes(updates: Params, leaves: list[Any], treedef: Any) -> None:
    """Updates must have the params' structure and shapes: never broadcast silently."""
    try:
        flat = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
        raise ValueError(f"updates do not have the structure of the params: {e}") from None
    for u, w in zip(flat, leaves, strict=True):
        if not masks.absent(w) and jnp.shape(u) != jnp.shape(w):
            raise ValueError(
                f"an update has shape {jnp.shape(u)} where its param has {jnp.shape(w)}"
            )


def _aligned(params: Params, tree: Params, what: str) -> list[Any]:
    try:
        return masks.flatten(params)[1].flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} does not have the structure of the params: {e}") from None


def _validated(rate: Rate, mask: Mask, **numbers: Any) -> None:
    """The checks of every public factory: `rate` and the named numbers are real,
    finite and `≥ 0` (schedules pass), and a mask of patterns is well formed."""
    groups.check_rate_arg(rate)
    for name, value in numbers.items():
        if value is not None:
            check_rate(value, name)
    masks._selector_of(mask)  # raises on malformed pattern lists


def add_l2_gradient(rate: Rate, mask: Mask = None) -> optax.GradientTransformation:
    """Coupled L2: `g ← g + λ_t·w`, the gradient of `λ/2·Σw²`.

    Place it *before* the optimizer's scaling. This is PyTorch's `weight_decay=λ`
    in `SGD` and `Adam`, and `optax.add_decayed_weights(λ)` placed first."""
    _validated(rate, mask)
    return _l2_gradient(rate, mask)


def _l2_gradient(rate: Rate, mask: Mask) -> optax.GradientTransformation:
    def make_step(count: jax.Array) -> LeafStep:
        return lambda g, w, r, _: (f32(g) + r * f32(w)).astype(g.dtype)

    return _leafwise(rate, mask, make_step)


def multiplier(
    lr_coupling: Coupling,
    learning_rate: ScalarOrSchedule | None,
    max_learning_rate: float | None = None,
) -> Callable[[jax.Array], Any]:
    """The per-step multiplier `c_t` of decoupled decay (see
    [`decoupled_weight_decay`][wdjax.transforms.decoupled_weight_decay]),
    as a function of the step count."""
    if lr_coupling not in COUPLINGS:
        raise ValueError(f"lr_coupling must be one of {COUPLINGS}, got {lr_coupling!r}")
    if lr_coupling == "constant":
        return lambda count: 1.0
    if learning_rate is None:
        raise ValueError(
            f"lr_coupling={lr_coupling!r} needs learning_rate= "
            "(the value or schedule the optimizer uses)"
        )
    if lr_coupling == "lr":
        return lambda count: _at(learning_rate, count)
    if max_learning_rate is None:
        if callable(learning_rate):
            raise ValueError(
                f"lr_coupling={lr_coupling!r} with a schedule needs max_learning_rate= (η_max)"
            )
        max_learning_rate = learning_rate
    if not callable(max_learning_rate) and not isinstance(max_learning_rate, jax.core.Tracer):
        if not max_learning_rate > 0:
            raise ValueError(
                f"lr_coupling={lr_coupling!r} divides by η_max (max_learning_rate, or the "
                f"learning_rate itself): it must be > 0, got "
                f"{max_learning_rate!r}"
            )
    power = 1 if lr_coupling == "schedule" else 2
    return lambda count: _at(learning_rate, count) ** power / max_learning_rate


def check_factor(rate: Rate, c: Callable[[jax.Array], Any]) -> None:
    """Refuse a concrete per-step factor `c_0·λ ≥ 1`: `w ← (1 − c·λ)·w` would zero or
    flip the weights at the first step. Schedules and traced values are checked as
    they are used (see [`DecayState`][wdjax.transforms.DecayState])."""
    values = rate.groups if isinstance(rate, groups.RateMap) else None
    leaves = (
        [r for _, r in values] + [rate.default] if values is not None else jax.tree.leaves(rate)
    )
    try:
        c0 = float(c(jnp.zeros([], jnp.int32)))
        worst = max((float(r) for r in leaves if not callable(r)), default=0.0)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced or scheduled: checked where it is used
    if c0 * worst >= 1:
        raise ValueError(
            f"the per-step decay factor c·λ = {c0 * worst:g} is >= 1: w ← (1 − c·λ)·w would "
            "zero or flip the weights at every step; lower λ (or η)"
        )


def _warn_if_below_resolution(c0: Any) -> Callable[[Params, list[Any]], None]:
    """Warn when `c·λ` is below half an ulp of a low-precision leaf's dtype:
    `w·(1 − c·λ)` then rounds back to `w` and the decay silently does nothing."""

    def check(params: Params, rates: list[Any]) -> None:
        for (path, w), r in zip(masks.leaves_with_paths(params), rates, strict=True):
            if r is None or jnp.finfo(w.dtype).bits >= 32:
                continue
            try:
                step = float(c0 * r)
            except (jax.errors.ConcretizationTypeError, TypeError):
                return  # traced: nothing to say at init
            half_ulp = float(jnp.finfo(w.dtype).eps) / 2
            if 0 < step < half_ulp:
                warnings.warn(
                    f"decay per step c·λ = {step:.3g} is below the resolution of {w.dtype} "
                    f"(eps/2 = {half_ulp:.3g}) at {path!r}: w·(1 − c·λ) rounds to w and the "
                    "decay does nothing; keep float32 master weights or raise λ",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return

    return check


def decoupled_weight_decay(
    rate: Rate,
    mask: Mask = None,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    cautious: bool = False,
    anchor: Params = None,
) -> optax.GradientTransformation:
    """Decoupled decay `u ← u − c_t·λ_t·w`, placed *after* the optimizer's scaling.

    `c_t` decides whether λ must be re-tuned when the learning rate changes:

    * `"lr"`: `c_t = η_t` — PyTorch `AdamW` and `optax.adamw`; with
      `learning_rate=η` this equals `optax.add_decayed_weights(λ)` placed before
      `optax.scale_by_learning_rate(η)`.
    * `"schedule"`: `c_t = η_t/η_max` — only the schedule's multiplier (AdamW
      paper, Algorithm 2; "independent" decay): λ no longer depends on η.
    * `"corrected"`: `c_t = η_t²/η_max` (AdamC, corrected decay).
    * `"constant"`: `c_t = 1`: `w ← (1 − λ)·w` every step.

    `cautious=True` decays only coordinates where the optimizer's step already
    moves `w` toward zero, `u ← u − c_t·λ·𝟙(u⊙w ≤ 0)⊙w` (cautious weight decay,
    Chen et al. 2025). `anchor` decays toward reference weights instead of zero,
    as [`decay_toward`][wdjax.transforms.decay_toward] does. With
    bfloat16/float16 weights a `RuntimeWarning` says when `c·λ` is too small to
    change them at all."""
    _validated(rate, mask, learning_rate=learning_rate, max_learning_rate=max_learning_rate)
    check_factor(rate, multiplier(lr_coupling, learning_rate, max_learning_rate))
    return _decoupled(rate, mask, learning_rate, lr_coupling, max_learning_rate, cautious, anchor)


def _decoupled(
    rate: Rate,
    mask: Mask,
    learning_rate: ScalarOrSchedule | None,
    lr_coupling: Coupling,
    max_learning_rate: float | None,
    cautious: bool,
    anchor: Params = None,
) -> optax.GradientTransformation:
    c = multiplier(lr_coupling, learning_rate, max_learning_rate)

    def make_step(count: jax.Array) -> LeafStep:
        c_t = c(count)

        def step(u: jax.Array, w: jax.Array, r: Any, w0: Any) -> jax.Array:
            d = f32(w) if w0 is None else f32(w) - f32(w0)
            decay = c_t * r * d
            if cautious:
                decay = jnp.where(jnp.real(f32(u) * jnp.conj(d)) <= 0, decay, 0.0)
            return (f32(u) - decay).astype(u.dtype)

        return step

    def largest(count: jax.Array, rates: list[Any]) -> jax.Array:
        chosen = [jnp.max(jnp.asarray(r, jnp.float32)) for r in rates if r is not None]
        return jnp.asarray(c(count), jnp.float32) * jnp.max(jnp.stack(chosen or [jnp.zeros([])]))

    c0 = c(jnp.zeros([], jnp.int32))
    return _leafwise(rate, mask, make_step, anchor, _warn_if_below_resolution(c0), largest)


def decay_toward(
    anchor: Params, rate: Rate, mask: Mask = None, **kwargs: Any
) -> optax.GradientTransformation:
    """Decoupled decay toward reference weights, `u ← u − c_t·λ_t·(w − w₀)`
    (the decoupled form of L2-SP). Keyword arguments as
    [`decoupled_weight_decay`][wdjax.transforms.decoupled_weight_decay];
    `anchor` lives in the state, so it is checkpointed and sharded with it."""
    return decoupled_weight_decay(rate, mask, anchor=anchor, **kwargs)


def _moved_to_keyword(name: str, keyword: str) -> None:
    warnings.warn(
        f"{name}'s second positional argument is now mask; pass {keyword}= by keyword "
        "(the positional form goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )


def l1_proximal(
    rate: Rate, mask: Mask = None, *, learning_rate: ScalarOrSchedule | None = None
) -> optax.GradientTransformation:
    """Proximal L1 (soft-thresholding), last in a chain:
    `w⁺ = w + u;  u ← sign(w⁺)·max(|w⁺| − η_t·λ_t, 0) − w`.

    Unlike the subgradient of `λ·Σ|w|`, this yields exact zeros. `learning_rate`
    is the η (value or schedule) the optimizer before it uses."""
    number = isinstance(mask, (int, float)) and not isinstance(mask, bool)
    if learning_rate is None and (number or np.ndim(mask) == 0 and hasattr(mask, "dtype")):
        _moved_to_keyword("l1_proximal", "learning_rate")  # the 0.1 form l1_proximal(rate, η)
        mask, learning_rate = None, mask
    if learning_rate is None:
        raise ValueError("l1_proximal needs learning_rate= (the η the optimizer uses)")
    _validated(rate, mask, learning_rate=learning_rate)
    return _l1_proximal(rate, mask, learning_rate)


def _l1_proximal(
    rate: Rate, mask: Mask, learning_rate: ScalarOrSchedule
) -> optax.GradientTransformation:
    def make_step(count: jax.Array) -> LeafStep:
        eta = _at(learning_rate, count)

        def step(u: jax.Array, w: jax.Array, r: Any, _: Any) -> jax.Array:
            z = f32(w) + f32(u)
            shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - eta * r, 0.0)
            # exactly u where nothing moved
            return jnp.where(shrunk == z, u, (shrunk - f32(w)).astype(u.dtype))

        return step

    return _leafwise(rate, mask, make_step)


def max_norm(
    max_value: float, mask: Mask = None, *, axis: int | tuple[int, ...] = 0
) -> optax.GradientTransformation:
    """Projection like Keras `MaxNorm`, last in a chain:
    `w⁺ = w + u;  u ← w⁺·min(1, c/‖w⁺‖) − w`, norms over `axis` (`0` for a
    Dense kernel `(in, out)`: one norm per output unit)."""
    ints = isinstance(mask, tuple) and mask and all(isinstance(a, int) for a in mask)
    if (isinstance(mask, int) and not isinstance(mask, bool)) or ints:
        _moved_to_keyword("max_norm", "axis")  # the 0.1 form max_norm(c, axis)
        mask, axis = None, mask
    _validated(1.0, mask, max_value=max_value)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)

    def check_axes(params: Params, rates: list[Any]) -> None:
        for (path, w), r in zip(masks.leaves_with_paths(params), rates, strict=True):
            if r is not None and not all(-w.ndim <= a < w.ndim for a in axes):
                raise ValueError(f"max_norm axis={axis} does not fit {path!r} of shape {w.shape}")

    def make_step(count: jax.Array) -> LeafStep:
        def step(u: jax.Array, w: jax.Array, r: Any, _: Any) -> jax.Array:
            z = f32(w) + f32(u)
            norm = jnp.sqrt(jnp.sum(sq(z), axis=axis, keepdims=True))
            projected = (z * (max_value / norm) - f32(w)).astype(u.dtype)
            return jnp.where(norm > max_value, projected, u)

        return step

    return _leafwise(1.0, mask, make_step, check_init=check_axes)
