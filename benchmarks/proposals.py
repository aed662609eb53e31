"""Proposed changes to wdjax, measured side by side with the library as it is.

* :func:`make_train_step_proposed`: ``wdjax.train.make_train_step`` with two changes:

  1. the skip of non-finite steps is a ``lax.cond`` around the update instead of
     ``jnp.where(ok, new, old)`` over params and optimizer state afterwards. With the
     ``where``, XLA fuses the Adam moment update into both the ``select`` and the
     parameter update (computing it twice) and, since the moments are updated in place,
     inserts a copy of every ``mu``/``nu`` buffer first (12 full-size copies for the MLP);
     with the ``cond`` the compiled step has no copies and one pass per leaf, as the
     hand-written step does;
  2. ``zero_fraction`` counts zeros in float32 (``jnp.sum((w == 0).astype(f32))``)
     instead of int32: XLA:CPU materializes the int32 ``convert`` as a full-size array
     before reducing it; the float32 count is one pass.

  Metrics and results are the same (checked by :func:`check_same`).

* :class:`FastPoolCNN`: the reference CNN (same params, same ``init``) whose 2x2 max-pool
  is ``max`` of four strided slices instead of ``nnx.max_pool`` (``lax.reduce_window``).
  XLA:CPU differentiates ``reduce_window`` with ``select_and_scatter``, a scalar loop that
  takes most of the CNN step; the strided-slice form differentiates into elementwise
  selects. Forward results are identical; gradients differ only at exact ties in a
  window (split instead of given to the first), which after a ReLU are zeros whose
  gradient is zero anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import masks
from wdjax import train as T
from wdjax.penalties import Penalty, regularized


def weight_metrics_f32(params: Any, decayed: Sequence[bool]) -> T.Metrics:
    """``train.weight_metrics`` with the zeros counted in float32 (exact below 2**24 per leaf)."""
    floats = [(w, d) for w, d in zip(jax.tree.leaves(params), decayed) if masks.is_float(w)]
    size = sum(w.size for w, _ in floats)
    zeros = sum((jnp.sum((w == 0).astype(jnp.float32)) for w, _ in floats), jnp.zeros([], jnp.float32))
    on = T._sq_norm([w for w, d in floats if d])
    off = T._sq_norm([w for w, d in floats if not d])
    return {
        "weight_norm": jnp.sqrt(on + off),
        "weight_norm_decayed": jnp.sqrt(on),
        "weight_norm_other": jnp.sqrt(off),
        "zero_fraction": zeros / max(size, 1),
    }


def make_train_step_proposed(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    penalties: Sequence[Penalty] = (),
    mask: Any = masks.default(),  # noqa: B008  (as in wdjax.train.make_train_step)
    weight_metrics: bool = True,
) -> Callable[[T.TrainState, dict], tuple[T.TrainState, T.Metrics]]:
    """``train.make_train_step`` with the update under ``lax.cond`` and float32 zero counts;
    ``weight_metrics=False`` leaves out the per-step weight norms and zero fraction (a
    possible option: ``fit`` could compute them once per scan chunk instead)."""

    def data_loss(params, model_state, x, y, rng):
        logits, new_model_state = model.apply(params, model_state, x, train=True, rng=rng)
        return T._cross_entropy(logits, y), (logits, new_model_state)

    objective = regularized(data_loss, *penalties, has_aux=True)

    def apply(operand):
        params, opt_state, grads, new_model_state, _ = operand
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_model_state

    def skip(operand):
        params, opt_state, _, _, old_model_state = operand
        return params, opt_state, old_model_state

    def step(state: T.TrainState, batch: dict) -> tuple[T.TrainState, T.Metrics]:
        rng = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)
        (total, aux), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.model_state, batch["x"], batch["y"], rng
        )
        logits, model_state = aux.pop("aux")
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(total)
        params, opt_state, model_state = jax.lax.cond(
            ok, apply, skip, (state.params, state.opt_state, grads, model_state, state.model_state)
        )
        new_state = T.TrainState(
            state.step + 1, params, opt_state, model_state, state.rng,
            state.skipped + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": aux.pop("data_loss"),
            **aux,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
            "grad_norm": grad_norm,
            **(weight_metrics_f32(new_state.params, masks.resolve(new_state.params, mask)) if weight_metrics else {}),
            "learning_rate": T._hyperparam(state.opt_state, "learning_rate"),
            "weight_decay": T._hyperparam(state.opt_state, "weight_decay"),
            "skipped": new_state.skipped,
        }
        return new_state, metrics

    return step


def check_same(model: Any, optimizer: optax.GradientTransformation, data: dict, steps: int = 3) -> float:
    """Max |difference| between the library's and the proposed step, over states and
    metrics after ``steps`` steps (and one step with a NaN batch, which both must skip)."""
    a = b = T.init_state(model, optimizer, jax.random.PRNGKey(0))
    fa = jax.jit(T.make_train_step(model, optimizer))
    fb = jax.jit(make_train_step_proposed(model, optimizer))
    bad = {"x": np.full_like(data["x"], np.nan), "y": data["y"]}
    worst = 0.0
    for batch in [data] * steps + [bad, data]:
        a, ma = fa(a, batch)
        b, mb = fb(b, batch)
        for u, v in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb)), strict=True):
            u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
            if not np.array_equal(np.isnan(u), np.isnan(v)):
                return float("inf")
            d = np.abs(np.nan_to_num(u) - np.nan_to_num(v))
            worst = max(worst, float(d.max()) if d.size else 0.0)
    if int(a.skipped) != 1 or int(b.skipped) != 1:
        return float("inf")
    return worst


# ---------------------------------------------------------------- CNN pooling


def max_pool_2x2_strided(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID (as ``nnx.max_pool(x, (2, 2), strides=(2, 2))``),
    as the max of four strided slices: its gradient is elementwise."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    x = x[:, :h, :w]
    return jnp.maximum(
        jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
        jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]),
    )


def max_pool_2x2_reduce_window(x: jax.Array) -> jax.Array:
    """What ``nnx.max_pool`` lowers to."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _conv_fwd_nhwc(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv3x3_canonical(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 SAME stride-1 NHWC/HWIO conv whose backward pass is written as two plain
    NHWC/HWIO forward convs (with explicit transposes). XLA:CPU runs only that
    "canonical" form with its fast (Eigen) conv; it rewrites the transposed convs of
    JAX's autodiff into it in a plain jit, but not inside a ``while`` loop (``lax.scan``),
    where they fall back to a naive loop."""
    return _conv_fwd_nhwc(x, w)


def _canon_fwd(x, w):
    return _conv_fwd_nhwc(x, w), (x, w)


def _canon_bwd(res, dy):
    x, w = res
    kh, kw = w.shape[:2]
    # dx: correlate dy with the flipped kernel, in/out channels swapped
    dx = _conv_fwd_nhwc(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    # dW[i, j, c, o] = sum_{b,h,w} xpad[b, h+i, w+j, c] dy[b, h, w, o]: a conv with the batch
    # as the contracted feature dim: lhs (C, H, W, B), rhs (H, W, B, O) -> (C, kh, kw, O)
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
        ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ).transpose(1, 2, 0, 3)
    return dx, dw


conv3x3_canonical.defvjp(_canon_fwd, _canon_bwd)


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, layout: str = "NHWC") -> jax.Array:
    if layout == "canonical":
        return conv3x3_canonical(x, kernel) + bias
    if layout == "NCHW":  # same weights, computed in NCHW/OIHW
        y = jax.lax.conv_general_dilated(
            x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1), (1, 1), "SAME",
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        ).transpose(0, 2, 3, 1)
    else:
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return y + bias


class FastPoolCNN:
    """The reference CNN (``models.create("cnn", ...)``, default config) as a pure function
    with a chosen pooling and conv layout; ``init`` is the library model's."""

    def __init__(self, base: Any, pool: str = "strided", layout: str = "NHWC") -> None:
        cfg = dict(base.config)
        if base.name != "cnn" or cfg.get("batch_norm") or cfg.get("dropout"):
            raise ValueError("FastPoolCNN mirrors the default CNN (no batch norm, no dropout)")
        self.base, self.pool_name, self.layout = base, pool, layout
        self.depth = len(cfg["channels"])
        self.pool = {"strided": max_pool_2x2_strided, "reduce_window": max_pool_2x2_reduce_window}[pool]

    def _key(self) -> tuple:
        return (self.base, self.pool_name, self.layout)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FastPoolCNN) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def init(self, key: jax.Array):
        return self.base.init(key)

    def apply(self, params, model_state, x, *, train: bool, rng=None):
        x = jnp.asarray(x, jnp.float32)
        for i in range(1, self.depth + 1):
            p = params[f"conv{i}"]
            x = self.pool(jax.nn.relu(_conv(x, p["kernel"], p["bias"], self.layout)))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
        logits = x @ params["head"]["kernel"] + params["head"]["bias"]
        return logits.astype(jnp.float32), model_state


def check_fast_pool(base: Any, data: dict) -> dict[str, float]:
    """Max |difference| of logits and gradients: library CNN vs :class:`FastPoolCNN`."""
    params, ms = base.init(jax.random.PRNGKey(0))

    def loss(model):
        def f(p):
            logits, _ = model.apply(p, ms, data["x"], train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean(), logits
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, la), ga = loss(base)
    out = {}
    for pool, layout in (("reduce_window", "NHWC"), ("strided", "NHWC"), ("strided", "canonical")):
        (_, lb), gb = loss(FastPoolCNN(base, pool, layout))
        tag = f"{pool}_{layout}"
        out[f"{tag}_logits"] = float(jnp.max(jnp.abs(la - lb)))
        out[f"{tag}_grads"] = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
    return out
