"""Running peer libraries in the parity tests: a PyTorch copy of the test MLP trained
step by step (:func:`torch_trajectory`), and peer code loaded without its heavy package
imports (:func:`load_timm`).

timm's package ``__init__`` imports every model, and through ``timm.layers`` torchvision,
which a CPU-only PyTorch install may lack (or have in a mismatched version). Its optimizers
and parameter-group rules need none of that: :func:`load_timm` imports one module of the
installed timm with stub parent packages in place of timm's ``__init__`` files."""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import pytest


def _is_timm(name: str) -> bool:
    return name == "timm" or name.startswith("timm.")


def _stub(name: str, directory: str) -> ModuleType:
    """An empty package ``name`` whose submodules are found in ``directory``."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [directory]
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [directory]
    return module


@contextlib.contextmanager
def load_timm(module_name: str, fill: Mapping[str, str] | None = None) -> Iterator[ModuleType]:
    """Import ``module_name`` (e.g. ``"timm.optim.adamw"``) from the installed timm without
    running any of timm's package ``__init__`` files; skip the test if timm is not installed.

    Every package on the way (``timm``, ``timm.optim``) is an empty stub whose ``__path__``
    is the real directory, so relative imports inside timm work. ``fill`` names, in order,
    stub packages to fill with a submodule's names, for modules that import a name the real
    ``__init__`` re-exports: ``timm.optim._param_groups`` does ``from timm.models import
    group_parameters``, so it needs ``fill={"timm.layers": "timm.layers.config",
    "timm.models": "timm.models._manipulate"}``.

    ``sys.modules`` is restored on exit (every ``timm*`` entry as it was), so nothing stubbed
    leaks into other tests; the module yielded stays usable."""
    if not _is_timm(module_name):
        raise ValueError(f"not a timm module: {module_name!r}")
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    root = list(spec.submodule_search_locations)[0]
    saved = {k: v for k, v in sys.modules.items() if _is_timm(k)}
    try:
        if "timm" not in sys.modules:  # a timm that really imported is used as it is
            fill = dict(fill or {})
            packages = {"timm"}
            for name in [module_name, *fill]:
                parts = name.split(".")
                packages.update(".".join(parts[:i]) for i in range(1, len(parts)))
            packages.update(fill)
            for name in sorted(packages, key=lambda n: n.count(".")):
                directory = os.path.join(root, *name.split(".")[1:])
                if not os.path.isdir(directory):
                    continue  # a module, not a package: imported for real below
                module = _stub(name, directory)
                sys.modules[name] = module
                parent, _, child = name.rpartition(".")
                if parent:
                    setattr(sys.modules[parent], child, module)
            for package, source in fill.items():
                names = vars(importlib.import_module(source))
                vars(sys.modules[package]).update(
                    {k: v for k, v in names.items() if not k.startswith("__")}
                )
        yield importlib.import_module(module_name)
    finally:
        for name in [k for k in sys.modules if _is_timm(k)]:
            del sys.modules[name]
        sys.modules.update(saved)


def torch_mlp() -> list:
    """A PyTorch copy of `helpers.MLP0`: one `nn.Linear` per dense layer (`weight` =
    `kernel.T`)."""
    import numpy as np
    import torch
    from helpers import MLP0

    layers = []
    for i in range(len(MLP0)):
        kernel, bias = (np.asarray(MLP0[f"dense{i}"][k]) for k in ("kernel", "bias"))
        layer = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
            layer.bias.copy_(torch.from_numpy(bias.copy()))
        layers.append(layer)
    return layers


def jax_params(layers: list) -> dict:
    """The params of `torch_mlp` layers in the JAX layout (`kernel` = `weight.T`)."""
    return {
        f"dense{i}": {
            "kernel": layer.weight.detach().numpy().T.copy(),
            "bias": layer.bias.detach().numpy().copy(),
        }
        for i, layer in enumerate(layers)
    }


def torch_loss(layers: list, x, y):
    """The MSE of the tanh MLP `layers` on one batch (as `helpers.mse`)."""
    import torch

    h = torch.from_numpy(x)
    for layer in layers[:-1]:
        h = torch.tanh(layer(h))
    return torch.nn.functional.mse_loss(layers[-1](h), torch.from_numpy(y))


def torch_trajectory(
    make_optimizer: Callable[[list], Any],
    steps: int,
    before_step: Callable[[Any, int], None] | None = None,
) -> dict:
    """Train a PyTorch copy of `helpers.MLP0` (tanh MLP, MSE on `helpers.BATCHES`) for
    `steps` steps with `make_optimizer(layers)`; `before_step(optimizer, t)` runs before
    each step (a schedule setting `group["lr"]`). Returns the params after each step,
    stacked, in the JAX layout (`kernel` = `weight.T`)."""
    import jax
    import numpy as np
    import torch
    from helpers import BATCHES

    torch.set_num_threads(1)
    layers = torch_mlp()
    optimizer = make_optimizer(layers)
    xs, ys = (np.array(b) for b in BATCHES)
    out = []
    for t in range(steps):
        if before_step is not None:
            before_step(optimizer, t)
        loss = torch_loss(layers, xs[t], ys[t])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(jax_params(layers))
    return jax.tree.map(lambda *xs: np.stack(xs), *out)
