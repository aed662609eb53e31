"""Tests for wdjax.masks: selectors, tree and callable masks, rate maps, validation,
Flax linen dicts / ``nnx.State`` / Equinox modules, and ``describe``."""

from __future__ import annotations

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import wdjax
from wdjax import masks

# A Flax-linen-style params dict, with an integer leaf that must never be decayed.
PARAMS = {
    "Embed_0": {"embedding": jnp.ones((5, 3))},
    "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
    "step": jnp.array(3, jnp.int32),
}
PATHS = [
    "Dense_0/bias",
    "Dense_0/kernel",
    "Embed_0/embedding",
    "LayerNorm_0/bias",
    "LayerNorm_0/scale",
    "head/bias",
    "head/kernel",
    "step",
]


def selected(params, mask) -> set[str]:
    chosen = masks.resolve(params, mask)
    return {p for (p, _), c in zip(masks.leaves_with_paths(params), chosen, strict=True) if c}


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
        (masks.default(), {"Dense_0/kernel", "head/kernel"}),
        (masks.default(embeddings=True), {"Dense_0/kernel", "head/kernel", "Embed_0/embedding"}),
        (masks.match("*/kernel") & ~masks.match("head/*"), {"Dense_0/kernel"}),
        (
            masks.match("head/*") | masks.regex("scale"),
            {"head/kernel", "head/bias", "LayerNorm_0/scale"},
        ),
        (
            ~masks.default(),
            {
                "Dense_0/bias",
                "Embed_0/embedding",
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


# ------------------------------------------------------------------ rate maps


def test_rate_map_first_match_wins_with_fallback():
    rm = masks.rates({"head/*": 2.0, "*/kernel": 1.0, "Embed_0/*": 0.1}, default=0.5)
    got = dict(zip(PATHS, masks.leaf_rates(PARAMS, rm), strict=True))
    assert got == {
        "Dense_0/bias": 0.5,
        "Dense_0/kernel": 1.0,
        "Embed_0/embedding": 0.1,
        "LayerNorm_0/bias": 0.5,
        "LayerNorm_0/scale": 0.5,
        "head/bias": 2.0,
        "head/kernel": 2.0,
        "step": None,  # never decayed
    }
    # default 0: leaves no group names are left alone
    got = dict(zip(PATHS, masks.leaf_rates(PARAMS, masks.rates({"*/kernel": 1e-4})), strict=True))
    assert {p for p, r in got.items() if r is not None} == {"Dense_0/kernel", "head/kernel"}


def test_rate_pytree_and_mask_together():
    per_leaf = {
        "Embed_0": 0.0,
        "Dense_0": 1.0,
        "LayerNorm_0": 3.0,
        "head": {"kernel": 2.0, "bias": 4.0},
        "step": 1.0,
    }
    got = dict(zip(PATHS, masks.leaf_rates(PARAMS, per_leaf, masks.default()), strict=True))
    assert {p: r for p, r in got.items() if r is not None} == {
        "Dense_0/kernel": 1.0,
        "head/kernel": 2.0,
    }


# ------------------------------------------------------------------ validation


def test_pattern_matching_nothing_raises():
    with pytest.raises(
        ValueError, match=r"mask pattern 'dense/\*' matches no parameter; paths are: Dense_0/bias"
    ):
        masks.resolve(PARAMS, masks.match("dense/*"))
    with pytest.raises(ValueError, match="mask pattern 'nope' matches no parameter"):
        masks.resolve(PARAMS, masks.match("*/kernel") | masks.regex("nope"))
    with pytest.raises(ValueError, match=r"rate pattern 'conv\*' matches no parameter"):
        masks.leaf_rates(PARAMS, masks.rates({"conv*": 1.0}))


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
    with pytest.raises(
        ValueError, match="rate tree does not fit the params: no entry for parameter 'b'"
    ):
        masks.leaf_rates({"w": jnp.ones(2), "b": jnp.ones(2)}, {"w": 1.0})


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


@pytest.mark.parametrize(
    ("bad", "msg"),
    [(-1.0, "must be >= 0"), (float("nan"), "must be finite"), ("x", "must be a number")],
)
def test_rate_maps_reject_bad_rates(bad, msg):
    with pytest.raises(ValueError, match=f"rate for '\\*/kernel' {msg}"):
        masks.rates({"*/kernel": bad})
    with pytest.raises(ValueError, match=f"default rate {msg}"):
        masks.rates({"*/kernel": 1.0}, default=bad)
    with pytest.raises(ValueError, match=f"rate for 'b' {msg}"):
        masks.leaf_rates({"w": jnp.ones(2), "b": jnp.ones(2)}, {"w": 1.0, "b": bad})


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

    # and through nnx.Optimizer, with the default (kernels-only) mask
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
    assert selected(params, masks.default()) == {"params/Dense_0/kernel"}
    assert selected(params, masks.default(embeddings=True)) == {
        "params/Dense_0/kernel",
        "params/Embed_0/embedding",
    }
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
    table = masks.describe(PARAMS, masks.rates({"head/*": 2.0, "*/kernel": 1e-4}), file=buf)
    assert [r.path for r in table.rows] == PATHS
    rows = {r.path: r for r in table.rows}
    assert rows["Dense_0/kernel"] == masks.Row("Dense_0/kernel", (3, 4), "float32", 12, 1e-4)
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
    table = masks.describe(PARAMS, masks.default(), rate=0.01, file=None)
    assert capsys.readouterr().out == ""
    assert {r.path: r.rate for r in table.rows if r.rate is not None} == {
        "Dense_0/kernel": 0.01,
        "head/kernel": 0.01,
    }
    assert table.decayed == 20
    masks.describe({"w": jnp.ones((2, 3), jnp.bfloat16)})
    out = capsys.readouterr().out
    assert "bfloat16" in out and "regularized 6 of 6 parameters (100.0%)" in out
