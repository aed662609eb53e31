"""Tests for wdjax.groups: per-group rates (``wdjax.rates``), per-leaf rate pytrees,
``leaf_rates`` (which resolves and does not validate) and ``check_rate`` /
``check_rate_arg`` (the validation the public factories run once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MASK_PARAMS as PARAMS
from helpers import MASK_PATHS as PATHS

import wdjax
from wdjax import groups, masks

# ------------------------------------------------------------------ rate maps


def test_rates_is_the_top_level_builder():
    assert wdjax.rates is groups.rates and wdjax.RateMap is groups.RateMap
    rm = wdjax.rates({"*/kernel": 1e-4}, default=1e-5)
    assert isinstance(rm, groups.RateMap)
    assert rm.groups == (("*/kernel", 1e-4),) and rm.default == 1e-5


def test_rate_map_first_match_wins_with_fallback():
    rm = wdjax.rates({"head/*": 2.0, "*/kernel": 1.0, "Embed_0/*": 0.1}, default=0.5)
    got = dict(zip(PATHS, groups.leaf_rates(PARAMS, rm), strict=True))
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
    got = dict(zip(PATHS, groups.leaf_rates(PARAMS, wdjax.rates({"*/kernel": 1e-4})), strict=True))
    assert {p for p, r in got.items() if r is not None} == {"Dense_0/kernel", "head/kernel"}


def test_rate_pytree_and_mask_together():
    per_leaf = {
        "Embed_0": 0.0,
        "Dense_0": 1.0,
        "LayerNorm_0": 3.0,
        "head": {"kernel": 2.0, "bias": 4.0},
        "step": 1.0,
    }
    got = dict(zip(PATHS, groups.leaf_rates(PARAMS, per_leaf, masks.default()), strict=True))
    assert {p: r for p, r in got.items() if r is not None} == {
        "Dense_0/kernel": 1.0,
        "head/kernel": 2.0,
    }


def test_literal_zero_leaves_alone_but_traced_zero_is_kept():
    assert groups.leaf_rates({"w": jnp.ones(2)}, 0) == [None]
    assert groups.leaf_rates({"w": jnp.ones(2)}, 0.0) == [None]
    rate = jnp.float32(0.0)
    assert groups.leaf_rates({"w": jnp.ones(2)}, rate) == [rate]
    jax.jit(lambda r: groups.leaf_rates({"w": jnp.ones(2)}, r)[0])(rate)  # traced: kept


def test_rate_pattern_or_tree_that_does_not_fit_raises():
    with pytest.raises(ValueError, match=r"rate pattern 'conv\*' matches no parameter"):
        groups.leaf_rates(PARAMS, wdjax.rates({"conv*": 1.0}))
    with pytest.raises(
        ValueError, match="rate tree does not fit the params: no entry for parameter 'b'"
    ):
        groups.leaf_rates({"w": jnp.ones(2), "b": jnp.ones(2)}, {"w": 1.0})


def test_leaf_rates_does_not_validate_values():
    """Validation happens once, in the public factories; ``leaf_rates`` only resolves."""
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    assert groups.leaf_rates(params, {"w": 1.0, "b": -1.0}) == [-1.0, 1.0]  # b, w
    with pytest.raises(ValueError, match="rate must be >= 0"):
        wdjax.add_l2_gradient({"w": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match="rate must be >= 0"):
        wdjax.l2({"w": 1.0, "b": -1.0})


# ------------------------------------------------------------------ validation

BAD_RATES = [
    pytest.param(-1.0, "must be >= 0", id="negative"),
    pytest.param(float("nan"), "must be finite", id="nan"),
    pytest.param(float("inf"), "must be finite", id="inf"),
    pytest.param(np.array([0.1, -0.1]), "must be >= 0", id="array-with-negative"),
    pytest.param("0.1", "must be a real number", id="string"),
    pytest.param(True, "must be a real number", id="bool"),
    pytest.param(np.bool_(False), "must be a real number", id="numpy-bool"),
    pytest.param(1 + 2j, "must be a real number", id="complex"),
    pytest.param(None, "must be a real number", id="none"),
    pytest.param(object(), "must be a real number", id="object"),
]


@pytest.mark.parametrize(("bad", "msg"), BAD_RATES)
def test_check_rate_rejects(bad, msg):
    with pytest.raises(ValueError, match=f"weight_decay {msg}"):
        groups.check_rate(bad, "weight_decay")


@pytest.mark.parametrize(
    "good",
    [0, 0.0, 1e-4, 3, np.float32(0.5), np.int64(2), jnp.float32(0.1), np.array([0.0, 1.0])],
)
def test_check_rate_accepts(good):
    groups.check_rate(good)


def test_schedules_and_traced_values_pass_and_are_checked_where_evaluated():
    groups.check_rate(lambda step: -1.0)  # a schedule: not evaluated here
    jax.jit(lambda r: groups.check_rate(r) or r)(jnp.float32(-1.0))  # traced: not concrete


@pytest.mark.parametrize(("bad", "msg"), BAD_RATES[:7])
def test_rates_rejects_bad_group_and_default_rates(bad, msg):
    with pytest.raises(ValueError, match=f"rate for '\\*/kernel' {msg}"):
        wdjax.rates({"*/kernel": bad})
    with pytest.raises(ValueError, match=f"default rate {msg}"):
        wdjax.rates({"*/kernel": 1.0}, default=bad)


@pytest.mark.parametrize(("bad", "msg"), BAD_RATES[:7])
def test_check_rate_arg_checks_every_leaf_of_a_pytree(bad, msg):
    with pytest.raises(ValueError, match=f"l1 {msg}"):
        groups.check_rate_arg({"w": 1.0, "b": {"x": bad}}, "l1")


def test_check_rate_arg_forms():
    groups.check_rate_arg(wdjax.rates({"*": 1.0}))  # checked when built
    groups.check_rate_arg({"a": 0.1, "b": [0.2, lambda t: 0.3]})
    for empty in ({}, [], None):
        with pytest.raises(ValueError, match="rate must be a number, a schedule, a pytree"):
            groups.check_rate_arg(empty)
