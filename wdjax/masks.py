"""Which parameters are regularized: masks select leaves of a params pytree.

A *mask* may be given as

* `None`: every floating-point leaf;
* a [`Selector`][wdjax.masks.Selector] (`match("*/kernel")`, `regex(...)`, `where(...)`,
  `default()`, `ALL`, `NONE`), combined with `&`, `|` and `~`;
* a glob string or a list of glob strings (shorthand for [`match`][wdjax.masks.match]);
* a pytree of bools shaped like the params, or a prefix of them
  (`{"encoder": False, "head": True}`);
* a function `params -> pytree of bools` (Optax's convention). Callable pytrees
  such as Equinox modules are read as trees, never called.

Leaves are named by their key path joined with `/` (`"layers/0/kernel"`); a
trailing `value` attribute (`flax.nnx` Variables) is dropped. Non-float
leaves are never regularized. Masks are resolved from paths, shapes and dtypes
only, so they are static under `jit`; rates stay traced.

How strongly each selected leaf is regularized is [`wdjax.groups`][]'s business
(per-group rates); [`describe`][wdjax.tables.describe] tabulates both.

Every mask is validated: a pattern that matches no parameter, a mask tree that
does not fit the params, and a mask that selects nothing all raise `ValueError`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from wdjax.types import Mask, Params, Predicate, is_float

# ---------------------------------------------------------------------- paths


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_parts(keypath: tuple) -> tuple[str, ...]:
    parts = tuple(_key_name(k) for k in keypath)
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]  # flax.nnx Variable
    return parts


def absent(x: Any) -> bool:
    """A parameter that is not there: `None` (filtered out, as `eqx.filter` leaves it)
    or Optax's `MaskedNode` (masked out by `optax.masked`). wdjax flattens these as
    leaves, never regularized, so a mask tree's entries for them still have a place."""
    return x is None or isinstance(x, optax.MaskedNode)


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """`jax.tree.flatten` with :func:`absent` parameters kept as leaves."""
    return jax.tree.flatten(tree, is_leaf=absent)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """`[(path, leaf), ...]` in flattening order (absent parameters included), paths
    joined with `/`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=absent)
    return [("/".join(_path_parts(kp)), leaf) for kp, leaf in flat]


# ------------------------------------------------------------------ selectors


@dataclasses.dataclass(frozen=True, eq=False)
class Selector:
    """Selects leaves by `predicate(path, leaf)`; combine with `&`, `|`, `~`.

    `patterns` are checked on resolution: each must match at least one leaf.
    Selectors are deliberately not callable, so `optax.inject_hyperparams`
    can never mistake one for a schedule.
    """

    predicate: Predicate
    description: str
    patterns: tuple[tuple[str, Callable[[str], bool]], ...] = ()

    def __and__(self, other: Selector) -> Selector:
        return Selector(
            lambda p, x: self.predicate(p, x) and other.predicate(p, x),
            f"({self.description} & {other.description})",
            self.patterns + other.patterns,
        )

    def __or__(self, other: Selector) -> Selector:
        return Selector(
            lambda p, x: self.predicate(p, x) or other.predicate(p, x),
            f"({self.description} | {other.description})",
            self.patterns + other.patterns,
        )

    def __invert__(self) -> Selector:
        return Selector(
            lambda p, x: not self.predicate(p, x), f"~{self.description}", self.patterns
        )

    def __repr__(self) -> str:
        return f"Selector({self.description})"


def _pattern_selector(
    kind: str, patterns: Sequence[str], test: Callable[[str, str], bool]
) -> Selector:
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{kind}() takes one or more non-empty pattern strings, got {patterns!r}")
    checks = tuple((p, (lambda path, p=p: test(p, path))) for p in patterns)
    return Selector(
        lambda path, _: any(check(path) for _, check in checks),
        f"{kind}({', '.join(map(repr, patterns))})",
        checks,
    )


def match(*patterns: str) -> Selector:
    """Leaves whose path matches any glob (`fnmatch`; `*` also crosses `/`)."""
    return _pattern_selector("match", patterns, lambda p, path: fnmatch.fnmatchcase(path, p))


def regex(*patterns: str) -> Selector:
    """Leaves whose path contains a match of any regular expression (`re.search`)."""
    compiled = {p: re.compile(p) for p in patterns if isinstance(p, str)}
    return _pattern_selector(
        "regex", patterns, lambda p, path: compiled[p].search(path) is not None
    )


def where(predicate: Predicate, description: str | None = None) -> Selector:
    """Leaves for which `predicate(path, leaf)` is true, e.g. `lambda p, w: w.ndim >= 2`."""
    return Selector(predicate, description or getattr(predicate, "__name__", "where"))


ALL = Selector(lambda p, x: True, "ALL")
NONE = Selector(lambda p, x: False, "NONE")

_BIAS_NAMES = frozenset({"bias", "b", "beta", "offset"})
_SCALE_NAMES = frozenset({"scale", "gamma"})
_NORM_MODULE = re.compile(r"norm|(^|_)(ln|bn|rms)(_?\d+|_f)?$", re.IGNORECASE)
_EMBEDDING = re.compile(r"embed|token|wte|wpe", re.IGNORECASE)


def _name(path: str) -> str:
    return path.rpartition("/")[2]


def is_bias(path: str, leaf: Any) -> bool:
    """A bias or normalization offset by name (`bias`, `b`, `beta`, `offset`)."""
    return _name(path).lower() in _BIAS_NAMES


def is_norm(path: str, leaf: Any) -> bool:
    """A normalization parameter by name: a `scale`/`gamma` leaf, or any leaf of a
    module whose name says norm (`LayerNorm_0`, `norm1`, `ln_f`, `bn2`, `attn_norm`)."""
    parts = path.split("/")
    return _name(path).lower() in _SCALE_NAMES or any(_NORM_MODULE.search(q) for q in parts[:-1])


def is_embedding(path: str, leaf: Any) -> bool:
    """An embedding table by name (`embed`, `token`, `wte`, `wpe` in its path)."""
    return bool(_EMBEDDING.search(path))


def default(*, embeddings: bool = True) -> Selector:
    """Weights: leaves with `ndim >= 2` that are neither a bias nor a normalization
    parameter *by name* ([`is_bias`][wdjax.masks.is_bias], [`is_norm`][wdjax.masks.is_norm]),
    whatever their rank. So the 2-D biases of attention heads, Equinox's `(C, 1, 1)`
    conv biases and the `(L, d)` biases and norm scales of stacked or scanned layers
    are not decayed. Embedding tables are decayed, as timm, Hugging Face and nanoGPT do;
    `embeddings=False` leaves them out."""
    chosen = where(lambda p, x: np.ndim(x) >= 2 and not is_bias(p, x) and not is_norm(p, x))
    if embeddings:
        return Selector(chosen.predicate, "default()")
    return Selector(
        lambda p, x: chosen.predicate(p, x) and not is_embedding(p, x),
        "default(embeddings=False)",
    )


DEFAULT = default()  # the default of the optimizers, the trainer and the CLI

_HF_FORBIDDEN = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _dotted(path: str) -> str:
    return path.replace("/", ".").lower()


TIMM = Selector(
    lambda p, x: not (np.ndim(x) <= 1 or p.replace("/", ".").endswith(".bias")),
    "TIMM",
)
"""timm's `param_groups_weight_decay`: every leaf but those with `ndim <= 1` or a
dotted name ending in `.bias` (case-sensitive, as timm's `name.endswith(".bias")`: a
top-level `bias` of rank 2 is decayed there too)."""

NANOGPT = Selector(lambda p, x: np.ndim(x) >= 2, "NANOGPT")
"""nanoGPT's `configure_optimizers`: leaves with `ndim >= 2` (embeddings included)."""

# HF also drops every parameter of an `nn.LayerNorm` by type; JAX params have no types,
# so the LayerNorm names its patterns miss (GPT-2's `ln_1`, `ln_f`; timm's `norm1`) stand in.
_HF_LAYERNORM_NAMES = re.compile(r"^ln(_?\d+|_f)?$|^norm\d+$")

HF = Selector(
    lambda p, x: (
        not (
            _HF_FORBIDDEN.search(_dotted(p))
            or any(_HF_LAYERNORM_NAMES.match(q.lower()) for q in p.split("/")[:-1])
        )
    ),
    "HF",
)
"""Hugging Face `Trainer.get_decay_parameter_names`: not a bias and not in a layer whose
name says `layernorm`, `rmsnorm` or `norm`, nor in a LayerNorm named `ln_*` or `norm<k>`
(HF finds those by type)."""


# ---------------------------------------------------------------- resolution


def _preview(paths: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(paths[:n])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _fit_tree(tree: Any, params: Params, what: str) -> list[Any]:
    """Broadcast a tree that is the params' structure or a prefix of it onto the
    params' leaves, matching by path; raise naming the first path that does not fit."""
    entries = [(tuple(p.split("/")) if p else (), v) for p, v in leaves_with_paths(tree)]
    out = []
    used = set()
    for path, _ in leaves_with_paths(params):
        parts = tuple(path.split("/")) if path else ()
        hits = [i for i, (e, _) in enumerate(entries) if parts[: len(e)] == e]
        if not hits:
            raise ValueError(
                f"{what} tree does not fit the params: no entry for parameter {path!r}"
            )
        used.add(hits[-1])
        out.append(entries[hits[-1]][1])
    for i, (e, _) in enumerate(entries):
        if i not in used:
            raise ValueError(
                f"{what} tree does not fit the params: entry {'/'.join(e)!r} matches no parameter"
            )
    return out


def _as_bool(value: Any, path: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, np.ndarray) and value.shape == () and value.dtype == bool
    ):
        return bool(value)
    raise ValueError(f"mask leaves must be Python bools, got {type(value).__name__} at {path!r}")


def _selector_of(mask: Mask) -> Selector | None:
    if mask is None:
        return ALL
    if isinstance(mask, Selector):
        return mask
    if isinstance(mask, str):
        return match(mask)
    if isinstance(mask, (list, tuple)) and mask and all(isinstance(m, str) for m in mask):
        return match(*mask)
    return None


def resolve(params: Params, mask: Mask = None) -> list[bool]:
    """The mask as one bool per leaf of `params` (flattening order, absent parameters
    included); non-float leaves are always `False`. Raises `ValueError` on any mask
    that does not fit or, given real arrays, selects nothing. Params without arrays
    (`{}`, Optax's placeholders in `optax.tree.map_params`) resolve to all `False`:
    what needs arrays is checked where arrays exist."""
    named = leaves_with_paths(params)
    if not any(is_float(x) for _, x in named):
        return [False] * len(named)
    selector = _selector_of(mask)
    if selector is not None:
        for pattern, check in selector.patterns:
            if not any(check(p) for p, _ in named):
                raise ValueError(
                    f"mask pattern {pattern!r} matches no parameter; "
                    f"paths are: {_preview([p for p, _ in named])}"
                )
        chosen = [is_float(x) and bool(selector.predicate(p, x)) for p, x in named]
    else:
        if callable(mask) and jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)):
            mask = mask(params)
        values = _fit_tree(mask, params, "mask")
        chosen = [is_float(x) and _as_bool(v, p) for (p, x), v in zip(named, values, strict=True)]
    if not any(chosen) and selector is not NONE:
        raise ValueError(
            f"mask {mask!r} selects no floating-point parameter, so it would do nothing; "
            f"paths are: {_preview([p for p, _ in named])} (use wdjax.masks.NONE to mean no decay)"
        )
    return chosen


# Names that moved out of this module: rates to wdjax.groups (deprecated here for one
# release), the describe table to wdjax.tables (kept here as the documented spelling).
_MOVED = {
    "rates": "wdjax.groups",
    "RateMap": "wdjax.groups",
    "leaf_rates": "wdjax.groups",
    "check_rate_arg": "wdjax.groups",
    "describe": "wdjax.tables",
    "Table": "wdjax.tables",
    "Row": "wdjax.tables",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'wdjax.masks' has no attribute {name!r}")
    home = _MOVED[name]
    if home == "wdjax.groups":
        warnings.warn(
            f"wdjax.masks.{name} moved to {home}.{name}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
    return getattr(importlib.import_module(home), name)
