"""What a mask and its rates do to a params pytree, as a table:
[`describe`][wdjax.tables.describe]."""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal, TextIO

import numpy as np

from wdjax.groups import RateMap, leaf_rates
from wdjax.masks import leaves_with_paths
from wdjax.types import Mask, Params, Rate


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf: its path, shape, dtype, size, rate and, for an array placed by a
    `NamedSharding`, its PartitionSpec."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    rate: float | None  # None: not regularized
    sharding: str | None = None


@dataclasses.dataclass(frozen=True)
class Table:
    """What [`describe`][wdjax.tables.describe] returns: one [`Row`][wdjax.tables.Row] per leaf, and
    totals."""

    rows: tuple[Row, ...]

    @property
    def decayed(self) -> int:
        return sum(r.size for r in self.rows if r.rate is not None)

    @property
    def total(self) -> int:
        return sum(r.size for r in self.rows)

    def __str__(self) -> str:
        sharded = any(r.sharding is not None for r in self.rows)
        head = ("path", "shape", "dtype", "size", "rate") + (("sharding",) if sharded else ())
        body = [
            (r.path, str(r.shape), r.dtype, f"{r.size:,}", "-" if r.rate is None else f"{r.rate:g}")
            + ((r.sharding or "-",) if sharded else ())
            for r in self.rows
        ]
        widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in (head, *body)
        ]
        share = self.decayed / self.total if self.total else 0.0
        lines.append(
            f"regularized {self.decayed:,} of {self.total:,} parameters ({share:.1%}); "
            f"not regularized {self.total - self.decayed:,}"
        )
        return "\n".join(lines)


def _spec(leaf: object) -> str | None:
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    return None if spec is None else str(spec)


def describe(
    params: Params,
    mask: Mask | RateMap = None,
    rate: Rate = 1.0,
    *,
    file: TextIO | Literal["stdout"] | None = "stdout",
) -> Table:
    """Tabulate every leaf's path, shape, dtype, size, rate (and PartitionSpec, for
    sharded params), print it to `file`
    (`"stdout"`: `sys.stdout` when called, so redirection works; `None`: don't
    print) and return it. `mask` may also be a [`RateMap`][wdjax.groups.RateMap], which then gives
    the rates: `describe(params, rates({...}))`."""
    if isinstance(mask, RateMap):
        mask, rate = None, mask
    per_leaf = leaf_rates(params, rate, mask)
    rows = tuple(
        Row(
            p,
            tuple(np.shape(x)),
            str(getattr(x, "dtype", type(x).__name__)),
            int(np.size(x)) if hasattr(x, "shape") else 0,
            None if r is None else float(r),
            _spec(x),
        )
        for (p, x), r in zip(leaves_with_paths(params), per_leaf, strict=True)
    )
    table = Table(rows)
    if file is not None:
        print(table, file=sys.stdout if file == "stdout" else file)
    return table
