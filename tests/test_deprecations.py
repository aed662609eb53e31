"""Every deprecated spelling still works for one release and says so with a
``DeprecationWarning``: rate names that moved from wdjax.masks to wdjax.groups, module
paths that moved into wdjax.lab, and the 0.1 positional forms of ``l1_proximal`` and
``max_norm``. The names that are aliases, not deprecations, do not warn."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
from helpers import P, U, bits, one_step

import wdjax
from wdjax import groups, masks, tables

MOVED_MODULES = ("checkpoint", "cli", "data", "models", "ops", "sweeps", "train")


@pytest.fixture
def no_old_modules():
    """Forget ``wdjax.<name>`` (module and attribute) for the test, so that the old paths
    are resolved afresh, and restore what was there after."""
    old = [f"wdjax.{n}" for n in MOVED_MODULES]
    saved_modules = {k: sys.modules.pop(k) for k in old if k in sys.modules}
    saved_attrs = {n: vars(wdjax).pop(n) for n in MOVED_MODULES if n in vars(wdjax)}
    yield
    for k in old:
        sys.modules.pop(k, None)
    for n in MOVED_MODULES:
        vars(wdjax).pop(n, None)
    sys.modules.update(saved_modules)
    for n, v in saved_attrs.items():
        setattr(wdjax, n, v)


# -------------------------------------------------------- masks -> groups


@pytest.mark.parametrize("name", ["rates", "leaf_rates", "RateMap", "check_rate_arg"])
def test_rate_names_in_masks_warn_and_are_the_groups_ones(name):
    with pytest.warns(DeprecationWarning, match=f"wdjax.masks.{name} moved to wdjax.groups.{name}"):
        alias = getattr(masks, name)
    assert alias is getattr(groups, name)


def test_deprecated_rate_names_still_work():
    with pytest.warns(DeprecationWarning):
        rm = masks.rates({"head/*": 2.0}, default=0.5)
    assert isinstance(rm, groups.RateMap)
    with pytest.warns(DeprecationWarning):
        assert masks.leaf_rates(P, rm) == [0.5, 0.5, 2.0, 2.0]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="rate must be >= 0"):
        masks.check_rate_arg(-1.0)
    with pytest.warns(DeprecationWarning):
        from wdjax.masks import RateMap  # noqa: F401  (the from-import form)


def test_describe_table_and_row_are_aliases_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert masks.describe is tables.describe
        assert masks.Table is tables.Table and masks.Row is tables.Row
        from wdjax.masks import describe  # noqa: F401


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'wdjax.masks' has no attribute 'nope'"):
        masks.nope  # noqa: B018
    with pytest.raises(AttributeError, match="module 'wdjax' has no attribute 'nope'"):
        wdjax.nope  # noqa: B018


# ------------------------------------------------------------ wdjax.lab


@pytest.mark.usefixtures("no_old_modules")
def test_from_wdjax_import_train_is_the_lab_module_with_a_warning():
    with pytest.warns(DeprecationWarning, match="wdjax.train moved to wdjax.lab.train"):
        from wdjax import train
    assert train is importlib.import_module("wdjax.lab.train")


@pytest.mark.usefixtures("no_old_modules")
def test_from_wdjax_train_import_fit_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="wdjax.train moved to wdjax.lab.train"):
        from wdjax.train import fit
    from wdjax.lab.train import fit as lab_fit

    assert fit is lab_fit


@pytest.mark.usefixtures("no_old_modules")
@pytest.mark.parametrize("name", ["ops", "sweeps", "models"])
def test_other_moved_modules_warn_too(name):
    with pytest.warns(DeprecationWarning, match=f"wdjax.{name} moved to wdjax.lab.{name}"):
        module = getattr(wdjax, name)
    assert module is importlib.import_module(f"wdjax.lab.{name}")


def test_lab_names_at_the_top_level_load_lazily_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wdjax.sweep is importlib.import_module("wdjax.lab.sweeps").sweep
        assert wdjax.lab is importlib.import_module("wdjax.lab")


# ---------------------------------------------------- 0.1 positional forms


def test_positional_l1_proximal_learning_rate_warns_and_is_the_keyword_form():
    with pytest.warns(DeprecationWarning, match="pass learning_rate= by keyword"):
        old = wdjax.l1_proximal(0.5, 0.4)
    new = wdjax.l1_proximal(0.5, learning_rate=0.4)
    assert bits(one_step(old)) == bits(one_step(new))
    assert bits(one_step(new)) != bits(U)  # the threshold η·λ = 0.2 acted


@pytest.mark.parametrize("axis", [0, 1, (0, 1)])
def test_positional_max_norm_axis_warns_and_is_the_keyword_form(axis):
    params = {"k": P["dense"]["kernel"], "h": P["head"]["kernel"]}
    updates = {"k": U["dense"]["kernel"], "h": U["head"]["kernel"]}
    with pytest.warns(DeprecationWarning, match="pass axis= by keyword"):
        old = wdjax.max_norm(0.5, axis)
    new = wdjax.max_norm(0.5, axis=axis)
    assert bits(one_step(old, updates, params)) == bits(one_step(new, updates, params))
    assert bits(one_step(new, updates, params)) != bits(updates)


def test_the_new_forms_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(wdjax.l1_proximal(0.5, "*/kernel", learning_rate=0.4))
        one_step(wdjax.max_norm(0.5, "*/kernel", axis=1))
        one_step(wdjax.max_norm(0.5, ["*/kernel"]))
        one_step(wdjax.add_l2_gradient(wdjax.rates({"*": 0.1})))
