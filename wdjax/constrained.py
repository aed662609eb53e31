"""Constrained parameter regularization (CPR; Franke et al., NeurIPS 2024), last in a chain.

Instead of a fixed λ, each selected matrix `W` gets its own Lagrange multiplier `μ`
that enforces `‖W‖² ≤ κ`. After the optimizer's step, `W⁺ = W + u`:

```text
μ ← max(0, μ + (ρ/n)·(‖W⁺‖² − κ));   W⁺ ← W⁺ − 2μ·W⁺
```

(`n` the number of entries of `W`, `ρ` = `kappa_update`). The bound κ is set, per
matrix, by `init`:

* `"inflection_point"` (the paper's default): κ is unset (no constraint) until the
  growth rate of an EMA of `‖W⁺‖` — sampled every `reg_step_size` steps — passes its
  peak (and is still above 1%): then `κ = ‖W⁺‖²` at that step;
* `"uniform"`: `κ = init_value`;  `"dependent"`: `κ = init_value·‖W₀‖²` at init;
* `"warm_start"`: no constraint for `warm_start` steps, then `κ = ‖W⁺‖²`.

This follows the reference implementation `pytorch-cpr` (its multi-tensor path) step
for step; `tests/test_cpr.py` checks it over 120 steps. Use it after an optimizer
without weight decay: `optax.chain(optax.adam(η), wdjax.cpr())`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wdjax import masks
from wdjax.types import Mask, Params, f32, sq

UNSET = 1e6  # κ of a matrix whose inflection point has not been found (pytorch-cpr's)
INITS = ("inflection_point", "uniform", "dependent", "warm_start")


class CPRState(NamedTuple):
    """The step count and, per leaf (a float32 scalar; unused where not selected): the
    multiplier μ, the bound κ, and the inflection detector's EMA of `‖W‖`, its last
    sample and its last relative slope."""

    count: jax.Array
    lagmul: Params
    kappa: Params
    ema: Params
    previous: Params
    slope: Params


def cpr(
    mask: Mask = masks.DEFAULT,
    *,
    kappa_update: float = 1.0,
    init: Literal["inflection_point", "uniform", "dependent", "warm_start"] = "inflection_point",
    init_value: float = 1000.0,
    reg_step_size: int = 200,
    ema_decay: float = 0.99,
    warm_start: int = 0,
) -> optax.GradientTransformation:
    """CPR on the leaves `mask` selects (see the module docstring)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not kappa_update >= 0:
        raise ValueError(f"kappa_update must be >= 0, got {kappa_update}")
    if not (isinstance(reg_step_size, int) and reg_step_size >= 1):
        raise ValueError(f"reg_step_size must be an int >= 1, got {reg_step_size!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if not (isinstance(warm_start, int) and warm_start >= 0):
        raise ValueError(f"warm_start must be an int >= 0, got {warm_start!r}")
    if init == "warm_start" and warm_start < 1:
        raise ValueError("init='warm_start' needs warm_start >= 1 steps")
    start = warm_start if init == "warm_start" else 0

    def scalars(params: Params, value: Any) -> Params:
        """One float32 scalar per leaf (absent parameters stay absent)."""
        leaves, treedef = masks.flatten(params)
        values = [w if masks.absent(w) else jnp.asarray(value(w), jnp.float32) for w in leaves]
        return treedef.unflatten(values)

    def init_fn(params: Params) -> CPRState:
        chosen = masks.resolve(params, mask)
        if not any(chosen):
            raise ValueError(f"cpr: the mask {mask!r} selects no parameter")
        kappa = {
            "inflection_point": lambda w: UNSET,
            "uniform": lambda w: init_value,
            "dependent": lambda w: init_value * jnp.sum(sq(f32(w))),
            "warm_start": lambda w: 0.0,
        }[init]
        zeros = [scalars(params, lambda w: 0.0) for _ in range(4)]  # distinct: donated
        return CPRState(jnp.zeros([], jnp.int32), zeros[0], scalars(params, kappa), *zeros[1:])

    def update_fn(updates: Params, state: CPRState, params: Params | None = None):
        if params is None:
            raise ValueError("cpr needs params: call update(updates, state, params)")
        chosen = masks.resolve(params, mask)
        count = state.count + 1
        leaves, treedef = masks.flatten(params)
        us = treedef.flatten_up_to(updates)
        fields = [treedef.flatten_up_to(t) for t in state[1:]]
        unset = [k == UNSET for k, c in zip(fields[1], chosen, strict=True) if c]
        detecting = init == "inflection_point" and jnp.any(jnp.stack(unset))
        sample = (count > reg_step_size) & (count % reg_step_size == 0)
        new_u, out = [], [list(f) for f in fields]
        for i, (w, u, c) in enumerate(zip(leaves, us, chosen, strict=True)):
            if not c:
                new_u.append(u)
                continue
            lagmul, kappa, ema, previous, slope = (f[i] for f in fields)
            z = f32(w) + f32(u)
            on = count > start
            grown = lagmul + (kappa_update / z.size) * (jnp.sum(sq(z)) - kappa)
            lagmul = jnp.where(on, jnp.maximum(grown, 0.0), lagmul)
            z = jnp.where(on, z - 2 * lagmul * z, z)
            norm2 = jnp.sum(sq(z))
            if init == "inflection_point":
                norm = jnp.sqrt(norm2)
                smoothed = jnp.where(
                    count >= reg_step_size, ema_decay * ema + (1 - ema_decay) * norm, norm
                )
                ema = jnp.where(detecting, smoothed, ema)
                current = (ema - previous) / ema
                sampled = detecting & sample
                found = sampled & (count > 3 * reg_step_size) & (slope > current)
                found &= (current > 0.01) & (kappa == UNSET)
                kappa = jnp.where(found, norm2, kappa)
                slope = jnp.where(sampled & (count > 2 * reg_step_size), current, slope)
                previous = jnp.where(sampled, ema, previous)
            elif init == "warm_start":
                kappa = jnp.where(count == start, kappa + norm2, kappa)
            for f, v in zip(out, (lagmul, kappa, ema, previous, slope), strict=True):
                f[i] = v
            new_u.append((z - f32(w)).astype(u.dtype))
        new_state = CPRState(count, *(treedef.unflatten(f) for f in out))
        return treedef.unflatten(new_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)
