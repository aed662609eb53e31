"""wdjax: weight decay and regularization for JAX, correct, explicit and fast.

`import wdjax` loads the core only (jax, optax, chex): masks, rates, penalties,
transforms and optimizers. The training lab (reference models, data, train loop,
checkpoints, sweeps, CLI) lives in [`wdjax.lab`][] and loads on first use:
`wdjax.sweep` and `wdjax.lab.train` import it then.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from wdjax import distributed, groups, hypergradient, masks, timescale
from wdjax.constrained import cpr
from wdjax.groups import RateMap, rates
from wdjax.optimizers import adam_l2, adamw, lionw, set_hyperparams, sgd_l2, sgdw
from wdjax.penalties import Penalty, elastic_net, group_lasso, l1, l2, l2_toward, regularized
from wdjax.tables import describe
from wdjax.transforms import (
    add_l2_gradient,
    decay_toward,
    decoupled_weight_decay,
    l1_proximal,
    max_norm,
)

__version__ = "0.2.0"

__all__ = [
    "Penalty",
    "RateMap",
    "SweepResult",
    "adam_l2",
    "adamw",
    "cpr",
    "add_l2_gradient",
    "decay_toward",
    "decoupled_weight_decay",
    "describe",
    "elastic_net",
    "group_lasso",
    "distributed",
    "groups",
    "hypergradient",
    "l1",
    "l1_proximal",
    "l2",
    "l2_toward",
    "lab",
    "lionw",
    "masks",
    "timescale",
    "max_norm",
    "rates",
    "regularized",
    "set_hyperparams",
    "sgd_l2",
    "sgdw",
    "sweep",
]

# Lab names reachable from the top level, loaded on first access.
_LAZY = {"sweep": "wdjax.lab.sweeps", "SweepResult": "wdjax.lab.sweeps", "lab": "wdjax.lab"}
# 0.1 module paths that moved into the lab: one release of DeprecationWarning.
_MOVED = ("checkpoint", "cli", "data", "models", "ops", "sweeps", "train")


def _moved(name: str) -> Any:
    warnings.warn(
        f"wdjax.{name} moved to wdjax.lab.{name}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module(f"wdjax.lab.{name}")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import wdjax.train` (and `from wdjax.train import fit`) still work for one
    release: the old module is a copy of the new one's namespace."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        parent, _, name = fullname.rpartition(".")
        if parent == "wdjax" and name in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def exec_module(self, module: Any) -> None:
        module.__dict__.update(
            {k: v for k, v in vars(_moved(module.__name__.rpartition(".")[2])).items()
             if not k.startswith("__")}
        )  # fmt: skip


sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "lab" else getattr(module, name)
    if name in _MOVED:
        return _moved(name)
    raise AttributeError(f"module 'wdjax' has no attribute {name!r}")
