"""Where things live on a device mesh: one [`Layout`][wdjax.distributed.Layout].

Only JAX's own machinery: `jax.sharding.Mesh`, `NamedSharding`, `PartitionSpec`,
`with_sharding_constraint` and `jax.make_array_from_process_local_data`; XLA inserts
every collective. A layout names four kinds of mesh axes:

| axis | shards | |
|---|---|---|
| `members` | the members of a sweep | no collectives |
| `data` | the batch | gradients all-reduced |
| `fsdp` | the batch *and* large params (and their optimizer state) | all-gathered per use |
| `model` | whatever [`Layout.rules`][wdjax.distributed.Layout] say | |

```python
from wdjax import distributed
layout = distributed.Layout(distributed.make_mesh("data=-1,fsdp=2"))
state_shardings = layout.shardings(opt_state, params)   # moments follow their params
```
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wdjax.masks import absent, flatten, leaves_with_paths
from wdjax.types import Params

AXES = ("members", "data", "fsdp", "model")
DATA_AXES = ("data", "fsdp")  # the batch is split over both


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """`"data=-1,fsdp=2"` (or a mapping) as `{axis: size}`, checked: known axis names,
    integer sizes `>= 1` or `-1` (the rest of the devices), at most one `-1`."""
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, size = part.partition("=")
            try:
                items[name.strip()] = int(size) if eq else None
            except ValueError:
                items[name.strip()] = None
            if items[name.strip()] is None:
                raise ValueError(f"mesh axis {part!r} is not name=size (as in data=-1,fsdp=2)")
    else:
        items = dict(spec)
    if not items:
        raise ValueError(f"a mesh needs at least one axis, got {spec!r}")
    for name, size in items.items():
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r}: use {', '.join(AXES)}")
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name}={size!r}: a size must be >= 1, or -1 for the rest")
    if sum(size == -1 for size in items.values()) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the rest), got {spec!r}")
    return {k: int(v) for k, v in items.items()}


def make_mesh(
    spec: str | Mapping[str, int] = "data=-1", devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over all devices (of every process), or `devices`, with named axes:
    `make_mesh("data=-1,fsdp=4")`; `-1` takes the devices the others leave. The device
    order is JAX's (`jax.make_mesh`: ICI-aware on TPU)."""
    shape = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    fixed = math.prod(s for s in shape.values() if s != -1)
    if -1 in shape.values():
        if len(devices) % fixed:
            raise ValueError(f"mesh {spec!r}: {len(devices)} devices do not divide by {fixed}")
        shape = {k: len(devices) // fixed if s == -1 else s for k, s in shape.items()}
    if math.prod(shape.values()) != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {math.prod(shape.values())} devices, there are {len(devices)}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), auto, devices=devices)


def put(tree: Any, shardings: Any) -> Any:
    """Host or device arrays onto `shardings` (a pytree of them, or a prefix), from
    every process's full copy (`jax.make_array_from_process_local_data` under several
    processes)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(
        lambda s, x: jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(s, np.asarray(a)), x
        ),
        shardings,
        tree,
        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree`'s arrays replicated over every device of `mesh`."""
    return put(tree, NamedSharding(mesh, P()))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first `NamedSharding`-placed leaf of `tree`, or None."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _map_paths(fn: Any, tree: Any) -> Any:
    """`fn(path, leaf)` over the leaves of `tree`; absent parameters (None,
    `optax.MaskedNode`) stay what they are."""
    flat, treedef = flatten(tree)
    out = [x if absent(x) else fn(p, x) for (p, _), x in zip(leaves_with_paths(tree), flat)]
    return jax.tree.unflatten(treedef, out)


def _spec(*axes: Any) -> P:
    """A PartitionSpec with trailing `None`s dropped."""
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where params, optimizer state, batches and sweep members live on `mesh`.

    Params: a leaf whose path matches a glob of `rules` (`(("*/embedding", P("model",
    None)), ...)`, the glob language of [`wdjax.masks.match`][]; first match wins) gets
    that spec. Otherwise, with an `fsdp` axis of size `n > 1`, a leaf of at least
    `fsdp_min_bytes` is split on its largest dimension divisible by `n` (big_vision's
    `fsdp` rule); the rest is replicated. Optimizer-state leaves follow the param of
    the same path suffix and shape; counts and injected hyperparameters are replicated.

    `compute_dtype` (say `jnp.bfloat16`): the loss and its gradients are computed with
    params and float inputs cast to it, while params, gradients and optimizer state
    stay float32 (mixed precision)."""

    mesh: Mesh
    rules: tuple[tuple[str, P], ...] = ()
    fsdp_min_bytes: int = 4 * 2**20
    compute_dtype: Any = None

    def __post_init__(self) -> None:
        for name in self.mesh.axis_names:
            if name not in AXES:
                raise ValueError(f"unknown mesh axis {name!r}: use {', '.join(AXES)}")
        object.__setattr__(self, "rules", tuple((str(g), P(*s)) for g, s in self.rules))
        for glob, spec in self.rules:
            unknown = {a for e in spec for a in (e if isinstance(e, tuple) else (e,))} - {
                None,
                *self.mesh.axis_names,
            }
            if unknown:
                raise ValueError(f"rule {glob!r}: {spec} names axes not in the mesh: {unknown}")
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype))

    # ------------------------------------------------------------------ sizes
    def size(self, axis: str) -> int:
        """Devices along `axis` (1 when the mesh does not have it)."""
        return self.mesh.shape.get(axis, 1)

    @property
    def data_axes(self) -> tuple[str, ...]:
        return tuple(a for a in DATA_AXES if a in self.mesh.axis_names)

    @property
    def data_size(self) -> int:
        """Devices a batch is split over."""
        return math.prod(self.size(a) for a in self.data_axes)

    # ----------------------------------------------------------------- params
    def param_spec(self, path: str, leaf: Any) -> P:
        """The PartitionSpec of one param (see the class docstring)."""
        for glob, spec in self.rules:
            if fnmatch.fnmatchcase(path, glob):
                return spec
        shape, n = tuple(np.shape(leaf)), self.size("fsdp")
        nbytes = math.prod(shape) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        if n == 1 or not shape or nbytes < self.fsdp_min_bytes:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], -d)):
            if shape[dim] % n == 0:
                return _spec(*(["fsdp" if d == dim else None for d in range(len(shape))]))
        return P()

    def _named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def params(self, params: Params) -> Any:
        """A NamedSharding per leaf of `params` (arrays or `jax.ShapeDtypeStruct`s)."""
        return _map_paths(lambda p, x: self._named(self.param_spec(p, x)), params)

    def shardings(self, tree: Any, params: Params) -> Any:
        """A NamedSharding per leaf of `tree` (an optimizer state, a TrainState...): a
        leaf whose path ends with a param's path and has its shape is sharded like it
        (the longest such path wins); every other leaf is replicated."""
        specs = [(p, np.shape(x), self.param_spec(p, x)) for p, x in leaves_with_paths(params)]
        specs.sort(key=lambda s: -len(s[0]))

        def spec_of(path: str, leaf: Any) -> P:
            for p, shape, spec in specs:
                if (path == p or path.endswith("/" + p)) and np.shape(leaf) == shape:
                    return spec
            return P()

        return _map_paths(lambda p, x: self._named(spec_of(p, x)), tree)

    # --------------------------------------------------------------- batches
    def batch(self, tree: Any = None) -> Any:
        """The sharding of a batch: its leading axis over the data axes. A pytree of
        them for `tree`, one sharding without."""
        sharding = self._named(P(self.data_axes or None))
        return sharding if tree is None else jax.tree.map(lambda _: sharding, tree)

    def replicated(self, tree: Any = None) -> Any:
        """A replicated sharding (for each leaf of `tree`)."""
        sharding = self._named(P())
        return sharding if tree is None else jax.tree.map(lambda _: sharding, tree)

    def members(self, tree: Any = None) -> Any:
        """Sweep members: the leading (member) axis over `members`, the rest replicated."""
        sharding = self._named(P("members" if "members" in self.mesh.axis_names else None))
        return sharding if tree is None else jax.tree.map(lambda _: sharding, tree)

    def constrain_batch(self, batch: Any) -> Any:
        """`with_sharding_constraint` of a batch inside a jitted step (under a vmap
        with `spmd_axis_name="members"`, each member's batch is split the same way)."""
        if not self.data_axes:
            return batch
        return jax.lax.with_sharding_constraint(batch, self.batch(batch))

    # -------------------------------------------------------------- placement
    def put(self, tree: Any, shardings: Any) -> Any:
        """[`put`][wdjax.distributed.put]: arrays onto `shardings` of this layout."""
        return put(tree, shardings)

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch this process feeds (its devices' slice)."""
        index = self.batch().addressable_devices_indices_map((batch_size,))
        rows = sorted({(i[0].start or 0, i[0].stop or batch_size) for i in index.values()})
        start, stop = rows[0][0], rows[-1][1]
        if sum(b - a for a, b in rows) != stop - start and len(rows) > 1:
            raise ValueError("this process's devices do not hold one contiguous slice of a batch")
        return slice(start, stop)

    def feed(self, batch: Any, batch_size: int) -> Any:
        """A global batch from this process's rows of it (`batch` holds only those)."""
        sharding = self.batch()
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding, np.asarray(x), (batch_size, *np.shape(x)[1:])
            ),
            batch,
        )

    def describe(self) -> str:
        axes = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        extra = f", compute {self.compute_dtype}" if self.compute_dtype is not None else ""
        return f"mesh({axes}) over {self.mesh.devices.size} devices{extra}"
