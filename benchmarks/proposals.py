"""Contrasts: what the library does not do, timed beside it.

The fixes first measured here are now in wdjax and the benchmarks time the library
itself: the ``lax.cond`` skip of non-finite steps and float32 zero counts
(:func:`wdjax.train.make_train_step`), and the CNN's convolution with a canonical backward
pass and strided-slice max-pool (:mod:`wdjax.ops`). What remains is a contrast the library
does not offer:

* :func:`make_train_step_without_weight_metrics`: the library's step with the per-step
  weight norms and zero fraction dropped from its outputs, so XLA never computes them
  (dead code). It measures what those metrics cost per step (``fit``'s epoch records use
  their last value; a ``weight_metrics=False`` option was not adopted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from wdjax import train

WEIGHT_METRICS = ("weight_norm", "weight_norm_decayed", "weight_norm_other", "zero_fraction")


def make_train_step_without_weight_metrics(
    model: Any, optimizer: optax.GradientTransformation, **kwargs: Any
) -> Callable[[train.TrainState, dict], tuple[train.TrainState, train.Metrics]]:
    """``train.make_train_step(model, optimizer, **kwargs)`` minus :data:`WEIGHT_METRICS`."""
    step = train.make_train_step(model, optimizer, **kwargs)

    def lean(state: train.TrainState, batch: dict) -> tuple[train.TrainState, train.Metrics]:
        state, metrics = step(state, batch)
        return state, {k: v for k, v in metrics.items() if k not in WEIGHT_METRICS}

    return lean
