"""Tests for wdjax.masks: selectors, tree and callable masks, validation, Flax linen
dicts / ``nnx.State`` / Equinox modules, ``wdjax.tables.describe``, and hypothesis
properties (set algebra of the combinators, describe agrees with resolve)."""

from __future__ import annotations

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from helpers import MASK_PARAMS as PARAMS
from helpers import MASK_PATHS as PATHS
from helpers import PROPERTY, float_trees, selected
from hypothesis import given
from hypothesis import strategies as st

import wdjax
from wdjax import masks, tables


def test_paths_are_key_paths_joined_with_slash():
    assert [p for p, _ in masks.leaves_with_paths(PARAMS)] == PATHS
    nested = {"layers": [{"w": jnp.ones(2)}, (jnp.ones(1), jnp.ones(1))]}
    assert [p for p, _ in masks.leaves_with_paths(nested)] == [
        "layers/0/w",
        "layers/1/0",
        "layers/1/1",
    ]


# ------------------------------------------------------------------ selectors


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (masks.match("*/kernel"), {"Dense_0/kernel", "head/kernel"}),
        (masks.match("*kernel", "head/*"), {"Dense_0/kernel", "head/kernel", "head/bias"}),
        ("*/kernel", {"Dense_0/kernel", "head/kernel"}),  # glob shorthand
        (["head/*", "Embed_0/*"], {"head/kernel", "head/bias", "Embed_0/embedding"}),
        (masks.regex(r"^Dense_\d+/"), {"Dense_0/kernel", "Dense_0/bias"}),
        (
            masks.regex("bias$", "scale$"),
            {"Dense_0/bias", "LayerNorm_0/bias", "LayerNorm_0/scale", "head/bias"},
        ),
        (
            masks.where(lambda p, x: x.size == 4),
            {"Dense_0/bias", "LayerNorm_0/bias", "LayerNorm_0/scale"},
        ),
        # the default: weights and embeddings, never biases or norm parameters
        (masks.default(), {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.DEFAULT, {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.default(embeddings=True), {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.default(embeddings=False), {"Dense_0/kernel", "head/kernel"}),
        # the peers' presets agree with it on this tree (tests/test_default_mask.py: where not)
        (masks.TIMM, {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.NANOGPT, {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.HF, {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.match("*/kernel") & ~masks.match("head/*"), {"Dense_0/kernel"}),
        (
            masks.match("head/*") | masks.regex("scale"),
            {"head/kernel", "head/bias", "LayerNorm_0/scale"},
        ),
        (
            ~masks.default(embeddings=False),
            {
                "Dense_0/bias",
                "Embed_0/embedding",
                "LayerNorm_0/bias",
                "LayerNorm_0/scale",
                "head/bias",
            },
        ),
        (
            ~masks.default(),
            {
                "Dense_0/bias",
                "LayerNorm_0/bias",
                "LayerNorm_0/scale",
                "head/bias",
            },
        ),
        (masks.ALL, set(PATHS) - {"step"}),
        (None, set(PATHS) - {"step"}),
        (masks.NONE, set()),
    ],
)
def test_selectors(mask, expected):
    assert selected(PARAMS, mask) == expected


def test_glob_star_crosses_slashes():
    deep = {"a": {"b": {"c": {"kernel": jnp.ones((2, 2))}}}, "kernel": jnp.ones((2, 2))}
    assert selected(deep, "*kernel") == {"a/b/c/kernel", "kernel"}
    assert selected(deep, "a/*") == {"a/b/c/kernel"}


def test_selectors_are_not_callable():
    # optax.inject_hyperparams treats callables as schedules; selectors must never look like one.
    assert not callable(masks.default())
    assert not callable(masks.match("*") & masks.ALL)


def test_selector_repr_describes_the_expression():
    sel = (masks.match("*/kernel") & ~masks.regex("head")) | masks.default()
    assert repr(sel) == "Selector(((match('*/kernel') & ~regex('head')) | default()))"


# ------------------------------------------------------- tree and callable masks


def test_tree_masks_full_and_prefix():
    full = jax.tree.map(lambda x: x.ndim == 2, PARAMS)
    assert selected(PARAMS, full) == {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}
    prefix = {
        "Embed_0": False,
        "Dense_0": True,
        "LayerNorm_0": False,
        "head": {"kernel": True, "bias": False},
        "step": True,
    }
    assert selected(PARAMS, prefix) == {"Dense_0/kernel", "Dense_0/bias", "head/kernel"}


def test_callable_mask_is_called_with_params():
    assert selected(PARAMS, lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)) == {
        "Dense_0/kernel",
        "head/kernel",
        "Embed_0/embedding",
    }


def test_plain_lists_and_tuples():
    params = [jnp.ones((2, 2)), (jnp.ones(2), {"w": jnp.ones((3, 1))})]
    assert selected(params, [True, (False, {"w": True})]) == {"0", "1/1/w"}
    assert selected(params, [False, True]) == {"1/0", "1/1/w"}
    assert selected(params, masks.default()) == {"0", "1/1/w"}


def test_non_float_leaves_are_never_selected():
    params = {
        "w": jnp.ones((2, 2)),
        "count": jnp.array(1),
        "flag": jnp.array([True, False]),
        "n": 3,
    }
    assert selected(params, masks.ALL) == {"w"}
    assert selected(params, {"w": True, "count": True, "flag": True, "n": True}) == {"w"}
    # and a transform leaves them bit for bit alone
    tx = wdjax.add_l2_gradient(0.5, masks.ALL)
    updates = {
        "w": jnp.zeros((2, 2)),
        "count": jnp.array(7),
        "flag": jnp.array([False, True]),
        "n": 5,
    }
    out, _ = tx.update(updates, tx.init(params), params)
    assert out["count"] is updates["count"] and out["flag"] is updates["flag"] and out["n"] == 5
    np.testing.assert_array_equal(out["w"], 0.5 * np.ones((2, 2)))


# ------------------------------------------------------------------ validation


def test_pattern_matching_nothing_raises():
    with pytest.raises(
        ValueError, match=r"mask pattern 'dense/\*' matches no parameter; paths are: Dense_0/bias"
    ):
        masks.resolve(PARAMS, masks.match("dense/*"))
    with pytest.raises(ValueError, match="mask pattern 'nope' matches no parameter"):
        masks.resolve(PARAMS, masks.match("*/kernel") | masks.regex("nope"))
    with pytest.raises(ValueError, match="mask pattern 'nope' matches no parameter"):
        masks.resolve(PARAMS, ~masks.match("nope"))  # negation keeps the check


def test_mask_tree_not_fitting_names_the_path():
    missing = {
        "Embed_0": False,
        "Dense_0": True,
        "LayerNorm_0": False,
        "head": {"kernel": True},
        "step": False,
    }
    with pytest.raises(
        ValueError, match="mask tree does not fit the params: no entry for parameter 'head/bias'"
    ):
        masks.resolve(PARAMS, missing)
    extra = {
        "Embed_0": False,
        "Dense_0": True,
        "LayerNorm_0": False,
        "head": True,
        "step": False,
        "tail": True,
    }
    with pytest.raises(
        ValueError, match="mask tree does not fit the params: entry 'tail' matches no parameter"
    ):
        masks.resolve(PARAMS, extra)
    too_deep = {"w": {"a": True}}
    with pytest.raises(ValueError, match="no entry for parameter 'w'"):
        masks.resolve({"w": jnp.ones(2)}, too_deep)


@pytest.mark.parametrize("leaf", [1, 1.0, "yes", jnp.array(True), np.array([True, False])])
def test_mask_leaves_must_be_bools(leaf):
    with pytest.raises(ValueError, match=r"mask leaves must be Python bools, got \w+ at 'b'"):
        masks.resolve({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, {"w": True, "b": leaf})


def test_mask_selecting_nothing_raises_but_none_is_allowed():
    with pytest.raises(ValueError, match="selects no floating-point parameter.*masks.NONE"):
        masks.resolve(PARAMS, ~masks.ALL)
    with pytest.raises(ValueError, match="selects no floating-point parameter"):
        masks.resolve({"b": jnp.ones(3)}, masks.default())
    with pytest.raises(ValueError, match="selects no floating-point parameter"):
        masks.resolve({"w": jnp.ones((2, 2)), "n": jnp.array(1)}, {"w": False, "n": True})
    assert masks.resolve(PARAMS, masks.NONE) == [False] * len(PATHS)


def test_bad_pattern_arguments():
    with pytest.raises(ValueError, match=r"match\(\) takes one or more non-empty pattern strings"):
        masks.match()
    with pytest.raises(ValueError, match=r"regex\(\) takes one or more non-empty pattern strings"):
        masks.regex(3)
    with pytest.raises(ValueError, match=r"match\(\) takes one or more non-empty pattern strings"):
        masks.match("")


# ----------------------------------------------------------- flax.nnx / Equinox


class _NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.norm(self.dense(x), use_running_average=True)))


def test_masks_over_nnx_state_with_optax():
    model = _NnxNet(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert isinstance(params, nnx.State)
    assert selected(params, masks.default()) == {"dense/kernel", "head/kernel"}
    assert selected(params, masks.match("norm/*")) == {"norm/scale", "norm/bias"}
    tree_mask = jax.tree.map(lambda x: x.ndim >= 2, params)  # an nnx.State of bools
    assert selected(params, tree_mask) == {"dense/kernel", "head/kernel"}

    tx = optax.chain(wdjax.add_l2_gradient(0.5, masks.default()), optax.sgd(0.1))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert isinstance(new, nnx.State)
    np.testing.assert_allclose(
        new["dense"]["kernel"][...], 0.95 * params["dense"]["kernel"][...], rtol=1e-6
    )
    np.testing.assert_array_equal(new["dense"]["bias"][...], params["dense"]["bias"][...])
    np.testing.assert_array_equal(new["norm"]["scale"][...], params["norm"]["scale"][...])

    nnx.update(model, new)  # the model takes the state back
    np.testing.assert_array_equal(model.head.kernel[...], new["head"]["kernel"][...])

    # and through nnx.Optimizer, with the default mask (the kernels)
    kernel, bias = model.dense.kernel[...], model.dense.bias[...]
    optimizer = nnx.Optimizer(model, wdjax.adamw(0.1, 0.5), wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(model.dense.kernel[...], 0.95 * kernel, rtol=1e-6)
    np.testing.assert_array_equal(model.dense.bias[...], bias)


def test_masks_over_flax_linen_params():
    class Net(linen.Module):
        @linen.compact
        def __call__(self, ids):
            return linen.Dense(3)(linen.LayerNorm()(linen.Embed(10, 4)(ids)))

    params = Net().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    assert selected(params, masks.default()) == {
        "params/Dense_0/kernel",
        "params/Embed_0/embedding",
    }
    assert selected(params, masks.default(embeddings=False)) == {"params/Dense_0/kernel"}
    assert selected(params, "*LayerNorm*") == {
        "params/LayerNorm_0/scale",
        "params/LayerNorm_0/bias",
    }


class _Tripwire(eqx.Module):
    """A callable Equinox module; a mask reader that calls it fails the test."""

    w: bool
    b: bool

    def __call__(self, *args):
        raise AssertionError("an Equinox module used as a mask tree was called")


class _Pair(eqx.Module):
    w: jax.Array
    b: jax.Array


def test_equinox_params_and_module_as_mask_tree():
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    params = eqx.filter(mlp, eqx.is_inexact_array)
    assert selected(params, masks.default()) == {
        "layers/0/weight",
        "layers/1/weight",
        "layers/2/weight",
    }
    mask_module = jax.tree.map(lambda x: x.ndim >= 2, params)  # an eqx.nn.MLP holding bools
    assert isinstance(mask_module, eqx.nn.MLP) and callable(mask_module)
    assert selected(params, mask_module) == {
        "layers/0/weight",
        "layers/1/weight",
        "layers/2/weight",
    }

    pair = _Pair(jnp.ones((2, 2)), jnp.ones(2))
    assert selected(pair, _Tripwire(w=False, b=True)) == {"b"}
    tx = wdjax.decoupled_weight_decay(0.5, _Tripwire(w=True, b=False), lr_coupling="constant")
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, pair), tx.init(pair), pair)
    np.testing.assert_array_equal(out.w, -0.5 * np.ones((2, 2)))
    np.testing.assert_array_equal(out.b, np.zeros(2))


# ------------------------------------------------------------------ describe


def test_describe_rows_totals_and_printing():
    buf = io.StringIO()
    table = tables.describe(PARAMS, wdjax.rates({"head/*": 2.0, "*/kernel": 1e-4}), file=buf)
    assert [r.path for r in table.rows] == PATHS
    rows = {r.path: r for r in table.rows}
    assert rows["Dense_0/kernel"] == tables.Row("Dense_0/kernel", (3, 4), "float32", 12, 1e-4)
    assert rows["head/bias"].rate == 2.0 and rows["head/kernel"].rate == 2.0
    assert rows["Dense_0/bias"].rate is None and rows["step"].rate is None
    assert rows["step"].dtype == "int32" and rows["step"].size == 1
    assert table.total == 15 + 12 + 4 + 4 + 4 + 8 + 2 + 1
    assert table.decayed == 12 + 8 + 2

    text = buf.getvalue()
    assert text == str(table) + "\n"
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "size", "rate"]
    assert lines[2].split() == ["Dense_0/kernel", "(3,", "4)", "float32", "12", "0.0001"]
    assert lines[1].split()[-1] == "-"
    assert lines[-1] == "regularized 22 of 50 parameters (44.0%); not regularized 28"


def test_describe_with_mask_and_rate_and_no_printing(capsys):
    table = wdjax.describe(PARAMS, masks.default(), rate=0.01, file=None)
    assert capsys.readouterr().out == ""
    assert {r.path: r.rate for r in table.rows if r.rate is not None} == {
        "Dense_0/kernel": 0.01,
        "head/kernel": 0.01,
        "Embed_0/embedding": 0.01,
    }
    assert table.decayed == 12 + 8 + 15
    table = wdjax.describe(PARAMS, masks.default(embeddings=False), rate=0.01, file=None)
    assert {r.path for r in table.rows if r.rate is not None} == {"Dense_0/kernel", "head/kernel"}
    assert table.decayed == 12 + 8
    tables.describe({"w": jnp.ones((2, 3), jnp.bfloat16)})
    out = capsys.readouterr().out
    assert "bfloat16" in out and "regularized 6 of 6 parameters (100.0%)" in out


def test_describe_is_one_function_under_three_names():
    assert wdjax.describe is tables.describe
    assert masks.describe is tables.describe  # the documented spelling, not deprecated
    assert masks.Table is tables.Table and masks.Row is tables.Row


# ------------------------------------------------------------------ properties


def _resolve_or_empty(params, mask) -> set[str]:
    """``selected``, with a mask that selects nothing giving the empty set."""
    try:
        return selected(params, mask)
    except ValueError as e:
        assert "selects no floating-point parameter" in str(e)
        return set()


@st.composite
def trees_and_selectors(draw, depth: int = 2):
    """A random params tree (float leaves of mixed dtypes plus an int leaf), and a random
    selector expression over it with the set of paths it should select."""
    tree, _ = draw(float_trees())
    params = {"net": tree["root"], "count": jnp.array(3, jnp.int32)}
    named = masks.leaves_with_paths(params)
    paths = [p for p, _ in named]
    floats = {p for p, x in named if jnp.issubdtype(x.dtype, jnp.floating)}

    def atom():
        kind = draw(st.sampled_from(["where", "match", "regex", "default", "ALL", "NONE"]))
        if kind == "where":
            subset = frozenset(draw(st.sets(st.sampled_from(paths))))
            return masks.where(lambda p, x, s=subset: p in s), subset & floats
        if kind == "match":
            p = draw(st.sampled_from(paths))
            if draw(st.booleans()):
                return masks.match(p), {p} & floats
            stem = p.rsplit("/", 1)[0]
            return masks.match(stem + "*"), {q for q in floats if q.startswith(stem)}
        if kind == "regex":
            part = draw(st.sampled_from(draw(st.sampled_from(paths)).split("/")))
            return masks.regex(f"(^|/){part}(/|$)"), {q for q in floats if part in q.split("/")}
        if kind == "default":
            return masks.default(), {p for p, x in named if p in floats and np.ndim(x) >= 2}
        return (masks.ALL, set(floats)) if kind == "ALL" else (masks.NONE, set())

    def expr(d: int):
        if d == 0 or draw(st.booleans()):
            return atom()
        op = draw(st.sampled_from(["and", "or", "not"]))
        a, sa = expr(d - 1)
        if op == "not":
            return ~a, floats - sa
        b, sb = expr(d - 1)
        return (a & b, sa & sb) if op == "and" else (a | b, sa | sb)

    return params, floats, expr(depth), expr(depth)


@PROPERTY
@given(data=trees_and_selectors())
def test_combinators_obey_set_algebra(data):
    params, floats, (a, sa), (b, sb) = data
    A, B = _resolve_or_empty(params, a), _resolve_or_empty(params, b)
    assert A == sa and B == sb
    assert _resolve_or_empty(params, a & b) == A & B
    assert _resolve_or_empty(params, a | b) == A | B
    assert _resolve_or_empty(params, ~a) == floats - A  # complement among float leaves
    # De Morgan
    assert _resolve_or_empty(params, ~(a & b)) == _resolve_or_empty(params, ~a | ~b)
    assert _resolve_or_empty(params, ~(a | b)) == _resolve_or_empty(params, ~a & ~b)
    assert _resolve_or_empty(params, ~~a) == A


@PROPERTY
@given(data=trees_and_selectors(depth=1), as_tree=st.booleans(), rate=st.floats(1e-6, 10.0))
def test_describe_agrees_with_resolve(data, as_tree, rate):
    params, _, (mask, expected), _ = data
    if as_tree:  # the same selection as a bool tree
        chosen = {p for p, _ in masks.leaves_with_paths(params)} & expected
        mask = jax.tree.unflatten(
            jax.tree.structure(params),
            [p in chosen for p, _ in masks.leaves_with_paths(params)],
        )
    try:
        table = tables.describe(params, mask, rate, file=None)
    except ValueError as e:
        assert "selects no floating-point parameter" in str(e)
        assert not expected
        return
    assert {r.path for r in table.rows if r.rate is not None} == selected(params, mask)
    assert all(r.rate == pytest.approx(rate) for r in table.rows if r.rate is not None)
    assert table.decayed == sum(r.size for r in table.rows if r.path in expected)


DEFAULT_BY_KIND = {
    "linen": {"params/Embed_0/embedding", "params/Dense_0/kernel", "params/head/kernel"},
    "nnx": {"dense/kernel", "head/kernel"},
    "equinox": {"layers/0/weight", "layers/1/weight", "layers/2/weight"},
}


def test_default_mask_over_each_kind_of_tree(tree_kind, params_tree):
    """A linen dict, an ``nnx.State`` and an Equinox module: the default mask is the
    kernels (and the embedding table), ``ALL`` every float leaf (not the ``None`` that
    ``eqx.filter`` leaves for the activations), and a transform gives back the same
    container."""
    named = masks.leaves_with_paths(params_tree)
    assert selected(params_tree, masks.DEFAULT) == DEFAULT_BY_KIND[tree_kind]
    assert selected(params_tree, masks.ALL) == {p for p, x in named if x is not None}
    tx = wdjax.add_l2_gradient(0.1)
    out = tx.update(params_tree, tx.init(params_tree), params_tree)[0]
    assert jax.tree.structure(out) == jax.tree.structure(params_tree)
