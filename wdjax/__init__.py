"""wdjax: weight decay and regularization for JAX, correct, explicit and fast."""

from wdjax import masks
from wdjax.optimizers import adam_l2, adamw, lionw, set_hyperparams, sgd_l2, sgdw
from wdjax.penalties import Penalty, elastic_net, group_lasso, l1, l2, l2_toward, regularized
from wdjax.sweeps import SweepResult, sweep
from wdjax.transforms import (
    add_l2_gradient,
    decay_toward,
    decoupled_weight_decay,
    l1_proximal,
    max_norm,
)

__version__ = "0.1.0"

__all__ = [
    "Penalty",
    "adam_l2",
    "adamw",
    "add_l2_gradient",
    "decay_toward",
    "decoupled_weight_decay",
    "elastic_net",
    "group_lasso",
    "l1",
    "l1_proximal",
    "l2",
    "l2_toward",
    "lionw",
    "masks",
    "max_norm",
    "regularized",
    "set_hyperparams",
    "sgd_l2",
    "sgdw",
    "sweep",
    "SweepResult",
]
