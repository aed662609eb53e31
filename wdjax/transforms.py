"""Weight decay as Optax gradient transformations.

Optax's sign convention: a transformation outputs updates ``u`` that
``optax.apply_updates`` adds, ``w ← w + u``. Gradients enter as ``g``; after the
optimizer's scaling, ``u = −η_t · direction``.

=============================  ======================================  ==================
transform                      rule                                    where in a chain
=============================  ======================================  ==================
``add_l2_gradient(λ)``         ``g ← g + λ·w``                         before the optimizer
``decoupled_weight_decay(λ)``  ``u ← u − c_t·λ·w``                     after the optimizer
``decay_toward(w₀, λ)``        ``u ← u − c_t·λ·(w − w₀)``              after the optimizer
``l1_proximal(λ, η)``          ``w⁺ = w + u;  w⁺ ← sign(w⁺)·max(|w⁺| − η_t·λ, 0)``   last
``max_norm(c, axis)``          ``w⁺ = w + u;  w⁺ ← w⁺·min(1, c/‖w⁺‖)``                last
=============================  ======================================  ==================

Every transform takes ``rate`` (scalar, schedule ``step -> λ``, traced value, per-leaf
pytree or :func:`wdjax.masks.rates`) and ``mask`` (see :mod:`wdjax.masks`). Masked-out
and non-float leaves pass through bit for bit; a Python ``0`` rate is the identity.
Arithmetic is in float32 for low-precision leaves, cast back to the update's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wdjax import masks
from wdjax._checks import check_rate

Params = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], Any]
LeafStep = Callable[[jax.Array, jax.Array, Any, Any], jax.Array]  # (u, w, rate, w0) -> u
Coupling = Literal["lr", "schedule", "corrected", "constant"]
COUPLINGS: tuple[str, ...] = ("lr", "schedule", "corrected", "constant")


class DecayState(NamedTuple):
    """Step count (for schedules) and, for :func:`decay_toward`, the anchor weights."""

    count: jax.Array
    anchor: Params = None


def _at(value: Any, count: jax.Array) -> Any:
    return value(count) if callable(value) else value


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _leafwise(
    rate: Any,
    mask: Any,
    make_step: Callable[[jax.Array], LeafStep],
    anchor: Params = None,
    check_init: Callable[[Params, list[Any]], None] | None = None,
) -> optax.GradientTransformation:
    """A transformation that rewrites each selected leaf with ``make_step(count)``."""
    masks.check_rate_arg(rate)

    def init_fn(params: Params) -> DecayState:
        if anchor is not None:
            _aligned(params, anchor, "anchor")
        count = jnp.zeros([], jnp.int32)
        rates = masks.leaf_rates(params, _at(rate, count), mask)  # validates mask and rates now
        if check_init is not None:
            check_init(params, rates)
        return DecayState(count, jax.tree.map(jnp.array, anchor))  # a copy: states get donated

    def update_fn(updates: Params, state: DecayState, params: Params | None = None):
        if params is None:
            raise ValueError("wdjax transforms need the params: call update(updates, state, params)")
        leaves, treedef = jax.tree.flatten(params)
        rates = masks.leaf_rates(params, _at(rate, state.count), mask)
        anchors = _aligned(params, state.anchor, "anchor") if state.anchor is not None else [None] * len(leaves)
        step = make_step(state.count)
        out = [
            u if r is None else step(u, w, r, w0)
            for u, w, r, w0 in zip(treedef.flatten_up_to(updates), leaves, rates, anchors, strict=True)
        ]
        return treedef.unflatten(out), DecayState(optax.safe_increment(state.count), state.anchor)

    return optax.GradientTransformation(init_fn, update_fn)


def _aligned(params: Params, tree: Params, what: str) -> list[Any]:
    try:
        return jax.tree.structure(params).flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} does not have the structure of the params: {e}") from None


def add_l2_gradient(rate: Any, mask: Any = None) -> optax.GradientTransformation:
    """Coupled L2: ``g ← g + λ_t·w``, the gradient of ``λ/2·Σw²``.

    Place it *before* the optimizer's scaling. This is PyTorch's ``weight_decay=λ``
    in ``SGD`` and ``Adam``, and ``optax.add_decayed_weights(λ)`` placed first."""

    def make_step(count: jax.Array) -> LeafStep:
        return lambda g, w, r, _: (_f32(g) + r * _f32(w)).astype(g.dtype)

    return _leafwise(rate, mask, make_step)


def _multiplier(
    lr_coupling: str, learning_rate: ScalarOrSchedule | None, max_learning_rate: float | None
) -> Callable[[jax.Array], Any]:
    """The per-step multiplier ``c_t`` of decoupled decay."""
    if lr_coupling not in COUPLINGS:
        raise ValueError(f"lr_coupling must be one of {COUPLINGS}, got {lr_coupling!r}")
    if lr_coupling == "constant":
        return lambda count: 1.0
    if learning_rate is None:
        raise ValueError(
            f"lr_coupling={lr_coupling!r} needs learning_rate= (the value or schedule the optimizer uses)"
        )
    check_rate(learning_rate, "learning_rate")
    if lr_coupling == "lr":
        return lambda count: _at(learning_rate, count)
    if max_learning_rate is None:
        if callable(learning_rate):
            raise ValueError(f"lr_coupling={lr_coupling!r} with a schedule needs max_learning_rate= (η_max)")
        max_learning_rate = learning_rate
    check_rate(max_learning_rate, "max_learning_rate")
    power = 1 if lr_coupling == "schedule" else 2
    return lambda count: _at(learning_rate, count) ** power / max_learning_rate


def _warn_if_below_resolution(c0: Any) -> Callable[[Params, list[Any]], None]:
    """Warn when ``c·λ`` is below half an ulp of a low-precision leaf's dtype:
    ``w·(1 − c·λ)`` then rounds back to ``w`` and the decay silently does nothing."""

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
                    f"(eps/2 = {half_ulp:.3g}) at {path!r}: w·(1 − c·λ) rounds to w and the decay "
                    "does nothing; keep float32 master weights or raise λ",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return

    return check


def decoupled_weight_decay(
    rate: Any,
    mask: Any = None,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    cautious: bool = False,
    anchor: Params = None,
) -> optax.GradientTransformation:
    """Decoupled decay ``u ← u − c_t·λ_t·w``, placed *after* the optimizer's scaling.

    ``c_t`` decides whether λ must be re-tuned when the learning rate changes:

    * ``"lr"``: ``c_t = η_t`` — PyTorch ``AdamW`` and ``optax.adamw``; with
      ``learning_rate=η`` this equals ``optax.add_decayed_weights(λ)`` placed before
      ``optax.scale_by_learning_rate(η)``.
    * ``"schedule"``: ``c_t = η_t/η_max`` — only the schedule's multiplier (AdamW
      paper, Algorithm 2; "independent" decay): λ no longer depends on η.
    * ``"corrected"``: ``c_t = η_t²/η_max`` (AdamC, corrected decay).
    * ``"constant"``: ``c_t = 1``: ``w ← (1 − λ)·w`` every step.

    ``cautious=True`` decays only coordinates where the optimizer's step already
    moves ``w`` toward zero, ``u ← u − c_t·λ·𝟙(u⊙w ≤ 0)⊙w`` (cautious weight decay,
    Chen et al. 2025). ``anchor`` decays toward reference weights instead of zero,
    as :func:`decay_toward` does. With bfloat16/float16 weights a ``RuntimeWarning``
    says when ``c·λ`` is too small to change them at all."""
    c = _multiplier(lr_coupling, learning_rate, max_learning_rate)

    def make_step(count: jax.Array) -> LeafStep:
        c_t = c(count)

        def step(u: jax.Array, w: jax.Array, r: Any, w0: Any) -> jax.Array:
            d = _f32(w) if w0 is None else _f32(w) - _f32(w0)
            decay = c_t * r * d
            if cautious:
                decay = jnp.where(_f32(u) * d <= 0, decay, 0.0)
            return (_f32(u) - decay).astype(u.dtype)

        return step

    c0 = c(jnp.zeros([], jnp.int32))
    return _leafwise(rate, mask, make_step, anchor, _warn_if_below_resolution(c0))


def decay_toward(anchor: Params, rate: Any, mask: Any = None, **kwargs: Any) -> optax.GradientTransformation:
    """Decoupled decay toward reference weights, ``u ← u − c_t·λ_t·(w − w₀)``
    (the decoupled form of L2-SP). Keyword arguments as :func:`decoupled_weight_decay`;
    ``anchor`` lives in the state, so it is checkpointed and sharded with it."""
    return decoupled_weight_decay(rate, mask, anchor=anchor, **kwargs)


def l1_proximal(rate: Any, learning_rate: ScalarOrSchedule, mask: Any = None) -> optax.GradientTransformation:
    """Proximal L1 (soft-thresholding), last in a chain:
    ``w⁺ = w + u;  u ← sign(w⁺)·max(|w⁺| − η_t·λ_t, 0) − w``.

    Unlike the subgradient of ``λ·Σ|w|``, this yields exact zeros."""
    check_rate(learning_rate, "learning_rate")

    def make_step(count: jax.Array) -> LeafStep:
        eta = _at(learning_rate, count)

        def step(u: jax.Array, w: jax.Array, r: Any, _: Any) -> jax.Array:
            z = _f32(w) + _f32(u)
            shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - eta * r, 0.0)
            return jnp.where(shrunk == z, u, (shrunk - _f32(w)).astype(u.dtype))  # exact where unmoved

        return step

    return _leafwise(rate, mask, make_step)


def max_norm(max_value: float, axis: int | tuple[int, ...] = 0, mask: Any = None) -> optax.GradientTransformation:
    """Projection like Keras ``MaxNorm``, last in a chain:
    ``w⁺ = w + u;  u ← w⁺·min(1, c/‖w⁺‖) − w``, norms over ``axis`` (``0`` for a
    Dense kernel ``(in, out)``: one norm per output unit)."""
    check_rate(max_value, "max_value")

    def make_step(count: jax.Array) -> LeafStep:
        def step(u: jax.Array, w: jax.Array, r: Any, _: Any) -> jax.Array:
            z = _f32(w) + _f32(u)
            norm = jnp.sqrt(jnp.sum(z * z, axis=axis, keepdims=True))
            return jnp.where(norm > max_value, (z * (max_value / norm) - _f32(w)).astype(u.dtype), u)

        return step

    return _leafwise(1.0, mask, make_step)
