"""Test configuration shared by every test module.

Eight host (CPU) devices are requested before JAX starts, so that sharding tests are
ordinary in-process test code (a user's own ``XLA_FLAGS`` wins; those tests then skip).
Helpers live in ``tests/helpers.py``; test modules never import from each other."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# the CLI keeps compiled programs in ~/.cache/wdjax by default: not from the tests (the
# CLI tests that exercise the cache give it a directory of their own)
os.environ.setdefault("WDJAX_COMPILE_CACHE", "off")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import TREE_KINDS  # noqa: E402

N_DEVICES = 8


@pytest.fixture
def cpu_devices() -> list:
    """Eight CPU devices, or a skip saying why there are not."""
    devices = jax.devices("cpu")
    if len(devices) < N_DEVICES:
        pytest.skip(
            f"needs {N_DEVICES} CPU devices, JAX has {len(devices)}: XLA_FLAGS was set before "
            f"the tests started ({os.environ.get('XLA_FLAGS')!r}); add "
            f"--xla_force_host_platform_device_count={N_DEVICES} to it"
        )
    return devices[:N_DEVICES]


@pytest.fixture
def mesh(cpu_devices: list) -> jax.sharding.Mesh:
    """A 2x4 ``("data", "model")`` mesh over eight CPU devices."""
    return jax.sharding.Mesh(np.array(cpu_devices).reshape(2, 4), ("data", "model"))


@pytest.fixture(params=sorted(TREE_KINDS))
def tree_kind(request: pytest.FixtureRequest) -> str:
    """Each kind of params tree: a linen dict, an ``nnx.State``, an Equinox module."""
    return request.param


@pytest.fixture
def params_tree(tree_kind: str):
    """The params tree of ``tree_kind`` (random values in every leaf)."""
    return TREE_KINDS[tree_kind]()
