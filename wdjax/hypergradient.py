"""λ that tunes itself from held-out data: hypergradient steps on `log λ`.

After a training update `θ⁺ = θ + u(g; λ)`, the held-out loss at `θ⁺` changes with λ as

```text
h = ∂L_val(θ⁺)/∂log λ = ⟨∇L_val(θ⁺), ∂θ⁺/∂log λ⟩
```

through that one update (T1–T2: Luketina et al., ICML 2016). For decoupled decay,
`θ⁺ = θ − η_t·u − c_t·λ·(M⊙θ)`, this is `−c_t·λ·⟨∇L_val(θ⁺), M⊙θ⟩`; for coupled L2 it
passes through the optimizer's preconditioner. A [`Tuner`][wdjax.hypergradient.Tuner]
computes it for any optimizer that injects the hyperparameter (every wdjax optimizer,
or `optax.inject_hyperparams`) as one forward-mode derivative (`jax.jvp`) of the update
with respect to `log λ`: exact, at the cost of one more update, plus the held-out
forward/backward pass that gives `∇L_val(θ⁺)`. Then, every `every` steps,

```text
m ← β₁·m + (1−β₁)·h,   v ← β₂·v + (1−β₂)·h²,   log λ ← clip(log λ − α·m̂/(√v̂ + ε))
```

and λ is written back into the optimizer state (`set_hyperparams`: no recompile). The
state is a pytree of scalars; everything is pure and jit/scan/vmap-clean. Several
injected names (`name=("wd_a", "wd_b")`, one decoupled decay per group) get one λ and one
hypergradient each. `neumann=i` replaces `∇L_val` by `Σ_{j≤i}(I − α·H)^j ∇L_val`
(Lorraine et al., AISTATS 2020: the implicit-function correction, `i` Hessian-vector
products of the training loss), which is T1–T2 at `i = 0`.

`horizon=H > 1` replaces the one update by the whole run so far (forward mode: Franceschi
et al., ICML 2017, with the damping of Donini et al., ICLR 2020): the tangents
`Z = ∂(θ, s)/∂log λ` of the params and the optimizer state are carried through every
update, `Z⁺ = J_θ,s(update)·μZ + ∂update/∂log λ` with `μ = 1 − 1/H`, and
`h = ⟨∇L_val(θ⁺), Z_θ⁺⟩`. It sees decay's delayed benefit (the gradient's response to
shrunk weights, through the Hessian), at the cost of a forward-over-reverse derivative of
each step and one tangent per tuned name the size of params plus optimizer state. Use
[`forward`][wdjax.hypergradient.Tuner.forward] for the update and
[`contract`][wdjax.hypergradient.Tuner.contract] for `h`.

Known failure modes: the one-step horizon is biased toward small λ (the benefit of decay
shows over many steps, its cost at once); `h` computed on *training* data drives λ to
its lower bound (the training loss always prefers less decay); on scale-invariant
(normalized) layers λ acts as an effective learning rate, not as a regularizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wdjax.optimizers import set_hyperparams
from wdjax.types import Params


class TunerState(NamedTuple):
    """`log_rate` (log λ), the moments of its normalized step, the step count, the
    last hypergradient `h` (for metrics) and, with `horizon > 1`, the tangents
    `(Z_params, Z_opt_state)` (a leading axis per name when several are tuned)."""

    log_rate: jax.Array
    mu: jax.Array
    nu: jax.Array
    count: jax.Array
    hypergradient: jax.Array
    tangent: Any = None


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _split(tree: Any) -> tuple[list, Any]:
    """The float leaves of `tree` and a function putting new ones back."""
    leaves, treedef = jax.tree.flatten(tree)

    def join(floats: list) -> Any:
        it = iter(floats)
        return jax.tree.unflatten(treedef, [next(it) if _is_float(x) else x for x in leaves])

    return [x for x in leaves if _is_float(x)], join


def _injected(opt_state: Any, name: str) -> jax.Array | None:
    found = jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
    values = [s.hyperparams[name] for s in found if name in getattr(s, "hyperparams", {})]
    return values[0] if values else None


@dataclasses.dataclass(frozen=True, eq=False)
class Tuner:
    """Tunes the injected hyperparameter `name` of `optimizer` (λ, `"weight_decay"`) by
    hypergradient steps of size `learning_rate` in `log λ`, every `every` training
    steps, within `bounds`. Use it from your own step:

    ```python
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    held_grads = jax.grad(held_out_loss)(new_params, held_batch)
    tuner_state, new_opt_state = tuner.step(
        tuner_state, grads, opt_state, params, held_grads, new_opt_state)
    ```

    [`wdjax.lab.train.fit`][] does this with its validation split (`fit(..., tuner=)`)."""

    optimizer: optax.GradientTransformation
    name: str | tuple[str, ...] = "weight_decay"
    learning_rate: float = 0.05
    every: int = 1
    bounds: tuple[float, float] = (1e-8, 1.0)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-12
    neumann: int = 0
    neumann_lr: float = 1e-2
    horizon: float = 1
    start: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.bounds
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"bounds must be 0 < low < high < inf, got {self.bounds}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be > 0 and finite, got {self.learning_rate}")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every must be an int >= 1, got {self.every!r}")
        if not (isinstance(self.neumann, int) and self.neumann >= 0):
            raise ValueError(f"neumann must be an int >= 0, got {self.neumann!r}")
        if not (self.neumann_lr > 0 and math.isfinite(self.neumann_lr)):
            raise ValueError(f"neumann_lr must be > 0 and finite, got {self.neumann_lr}")
        if not self.horizon >= 1:
            raise ValueError(
                f"horizon must be >= 1 (steps; inf: the whole run), got {self.horizon}"
            )
        if self.horizon > 1 and self.neumann:
            raise ValueError("neumann corrects the one-step hypergradient: use it with horizon=1")
        if not (isinstance(self.start, int) and self.start >= 0):
            raise ValueError(f"start must be an int >= 0, got {self.start!r}")
        for beta in (self.b1, self.b2):
            if not 0 <= beta < 1:
                raise ValueError(f"moment coefficients must be in [0, 1), got {beta}")

    @property
    def names(self) -> tuple[str, ...]:
        """The tuned hyperparameters: one name, or one per group (`name=("wd_a", "wd_b")`,
        each injected by the optimizer, e.g. one decoupled decay per mask)."""
        return (self.name,) if isinstance(self.name, str) else tuple(self.name)

    def _set(self, opt_state: Any, log_rate: jax.Array) -> Any:
        rates = jnp.exp(jnp.atleast_1d(log_rate))
        return set_hyperparams(opt_state, **{n: rates[i] for i, n in enumerate(self.names)})

    def init(self, opt_state: Any, params: Params = None) -> TunerState:
        """Start from the λ(s) in `opt_state` (clipped to `bounds`). One name: scalars;
        several: arrays with one entry per name. `horizon > 1` needs `params` (the
        tangents start at zero)."""
        values = [_injected(opt_state, n) for n in self.names]
        missing = [n for n, v in zip(self.names, values, strict=True) if v is None]
        if missing:
            raise ValueError(
                f"the optimizer does not inject {', '.join(map(repr, missing))}: use a wdjax "
                "optimizer or optax.inject_hyperparams"
            )
        lo, hi = self.bounds
        log_rate = jnp.log(jnp.clip(jnp.stack(values).astype(jnp.float32), lo, hi))
        shape = () if isinstance(self.name, str) else (len(self.names),)
        zeros = [jnp.zeros(shape, jnp.float32) for _ in range(3)]  # distinct buffers: donated
        tangent = None
        if self.horizon > 1:
            if params is None:
                raise ValueError(
                    "a tuner with horizon > 1 needs params: tuner.init(opt_state, params)"
                )
            tangent = jax.tree.map(
                lambda x: (
                    jnp.zeros(shape + jnp.shape(x), x.dtype) if _is_float(x) else jnp.array(x)
                ),
                (params, opt_state),
            )
        return TunerState(
            log_rate.reshape(shape), zeros[0], zeros[1], jnp.zeros([], jnp.int32), zeros[2], tangent
        )

    def neumann_vector(self, held_out_grads: Params, hvp: Any) -> Params:
        """`Σ_{j≤i} (I − α·H)^j ∇L_val` with `i = neumann`, `α = neumann_lr` and `hvp(v) =
        H·v` of the training loss: the implicit-function correction of Lorraine et al.
        (AISTATS 2020), `α·H⁻¹∇L_val` as `i → ∞`; `∇L_val` itself at `i = 0`."""
        if self.neumann == 0:
            return held_out_grads
        if hvp is None:
            raise ValueError(f"neumann={self.neumann} needs hvp: v -> H·v of the training loss")
        term = total = held_out_grads
        for _ in range(self.neumann):
            term = jax.tree.map(lambda p, hp: p - self.neumann_lr * hp, term, hvp(term))
            total = jax.tree.map(jnp.add, total, term)
        return total

    def hypergradient(
        self,
        grads: Params,
        opt_state: Any,
        params: Params,
        held_out_grads: Params,
        hvp: Any = None,
    ) -> jax.Array:
        """`∂L_val(θ⁺)/∂log λ` (one per name) through the update from `(grads,
        opt_state, params)`; `held_out_grads` is `∇L_val` at the updated params. With
        `neumann > 0`, `hvp(v)` (the training loss's Hessian times `v`) corrects it for
        the longer horizon ([`neumann_vector`][wdjax.hypergradient.Tuner.neumann_vector])."""
        held_out_grads = self.neumann_vector(held_out_grads, hvp)

        def updated(log_rate: jax.Array) -> Params:
            updates, _ = self.optimizer.update(grads, self._set(opt_state, log_rate), params)
            return optax.apply_updates(params, updates)

        values = [_injected(opt_state, n) for n in self.names]
        log_rate = jnp.log(jnp.stack(values).astype(jnp.float32))
        _, linear = jax.linearize(updated, log_rate)
        tangents = jax.vmap(linear)(jnp.eye(len(self.names), dtype=jnp.float32))
        dots = jax.tree.map(
            lambda g, t: jnp.tensordot(t.astype(jnp.float32), g.astype(jnp.float32), axes=g.ndim),
            held_out_grads,
            tangents,
        )
        h = sum(jax.tree.leaves(dots), jnp.zeros(len(self.names), jnp.float32))
        return h[0] if isinstance(self.name, str) else h

    def forward(
        self,
        state: TunerState,
        value_and_grad: Any,
        opt_state: Any,
        params: Params,
    ) -> tuple[Any, Params, Params, Any, TunerState]:
        """One update with its tangents (`horizon > 1`): `value_and_grad(params) ->
        (value, grads)` is the training objective's; returns `(value, grads, updates,
        new_opt_state, state)` with `state.tangent = ∂(θ⁺, s⁺)/∂log λ` (the incoming
        tangents damped by `μ = 1 − 1/horizon`). A tangent that is not finite (Adam's
        `√v` at `v = 0`: a coordinate that never had a gradient) is taken as 0."""
        z_params, z_state = state.tangent
        floats, join = _split(opt_state)

        def update(p: Params, s: list, log_rate: jax.Array) -> tuple:
            value, grads = value_and_grad(p)
            updates, new_state = self.optimizer.update(grads, self._set(join(s), log_rate), p)
            new_floats, _ = _split(new_state)
            aux = (value, grads, updates, new_state)
            return (optax.apply_updates(p, updates), new_floats), aux

        log_rate = jnp.atleast_1d(state.log_rate)
        (_, _), linear, aux = jax.linearize(update, params, floats, log_rate, has_aux=True)
        damp = 1.0 - 1.0 / self.horizon
        single = isinstance(self.name, str)
        z = (z_params, _split(z_state)[0])
        z = jax.tree.map(lambda t: damp * (t[None] if single else t), z)
        out = jax.vmap(linear)(*z, jnp.eye(len(self.names), dtype=log_rate.dtype))
        out = jax.tree.map(lambda t: jnp.where(jnp.isfinite(t), t, 0), out)
        if single:
            out = jax.tree.map(lambda t: t[0], out)
        tangent = (out[0], _split(z_state)[1](out[1]))
        return (*aux, state._replace(tangent=tangent))

    def contract(self, state: TunerState, held_out_grads: Params) -> jax.Array:
        """`h = ⟨∇L_val(θ⁺), Z_θ⁺⟩` (one per name) from the tangents of
        [`forward`][wdjax.hypergradient.Tuner.forward]."""
        axes = 0 if isinstance(self.name, str) else 1
        dots = jax.tree.map(
            lambda g, z: jnp.tensordot(
                z.astype(jnp.float32),
                g.astype(jnp.float32),
                axes=[tuple(range(axes, z.ndim)), tuple(range(g.ndim))],
            ),
            held_out_grads,
            state.tangent[0],
        )
        shape = () if isinstance(self.name, str) else (len(self.names),)
        return sum(jax.tree.leaves(dots), jnp.zeros(shape, jnp.float32))

    def update(self, state: TunerState, hypergradient: jax.Array) -> TunerState:
        """One normalized step on `log λ` (only every `every`-th call from call `start`
        on moves it; the moments see every hypergradient)."""
        count = state.count + 1
        h = jnp.where(jnp.isfinite(hypergradient), hypergradient, 0.0).astype(jnp.float32)
        mu = self.b1 * state.mu + (1 - self.b1) * h
        nu = self.b2 * state.nu + (1 - self.b2) * h * h
        t = count.astype(jnp.float32)
        step = (mu / (1 - self.b1**t)) / (jnp.sqrt(nu / (1 - self.b2**t)) + self.eps)
        lo, hi = (math.log(b) for b in self.bounds)
        moved = jnp.clip(state.log_rate - self.learning_rate * step, lo, hi)
        due = (count % self.every == 0) & (count > self.start)
        return TunerState(jnp.where(due, moved, state.log_rate), mu, nu, count, h, state.tangent)

    def apply(self, state: TunerState, opt_state: Any) -> Any:
        """`opt_state` with λ = `exp(log_rate)` (each name its own)."""
        return self._set(opt_state, state.log_rate)

    def step(
        self,
        state: TunerState,
        grads: Params,
        opt_state: Any,
        params: Params,
        held_out_grads: Params,
        new_opt_state: Any,
        hvp: Any = None,
    ) -> tuple[TunerState, Any]:
        """The hypergradient of the update `(grads, opt_state, params) → θ⁺`, one step
        on `log λ`, and `new_opt_state` carrying the new λ."""
        h = self.hypergradient(grads, opt_state, params, held_out_grads, hvp)
        state = self.update(state, h)
        return state, self.apply(state, new_opt_state)

    def rate(self, state: TunerState) -> jax.Array:
        """The current λ (one per name)."""
        return jnp.exp(state.log_rate)
