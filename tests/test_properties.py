"""The contract every public transform and optimizer keeps, checked over one table.

``ROWS`` holds every transform (each lr coupling, cautious or not, decay toward an anchor,
proximal L1, max-norm) and every optimizer (with and without ``l1``), built as
``make(rate, mask, params)``. Over it, with ``pytest.mark.parametrize``:

* rate 0 is the identity, bit for bit (an optimizer at rate 0 is its undecayed Optax
  chain), for a Python 0 and a traced 0, on random trees too (hypothesis);
* masked-out leaves are untouched, bit for bit, on linen dicts, ``nnx.State`` and
  Equinox modules, and the selected ones are changed;
* dtypes and shapes are preserved, for float32 and bfloat16 params and gradients;
* rates may be traced: ``vmap`` over λ under ``jit`` and without (chex variants) gives
  what each λ gives alone;
* bad rates (negative, NaN, inf, a string, a bool) raise ``ValueError`` naming the
  argument, when the transform is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from absl.testing import parameterized
from helpers import PROPERTY, TREE_KINDS, astype, bits, float_trees, like, randomize, run_steps
from hypothesis import given, settings
from hypothesis import strategies as st

import wdjax
from wdjax import masks

LR = 0.1
SCHED = optax.linear_schedule(LR, LR / 10, 5)
Make = Callable[[Any, Any, Any], optax.GradientTransformation]  # (rate, mask, params) -> tx


@dataclasses.dataclass(frozen=True)
class Row:
    """One public transform or optimizer, as ``make(rate, mask, params)``."""

    id: str
    make: Make
    reference: Callable[[], optax.GradientTransformation] | None = None  # optimizers: at λ=0
    rate_name: str = "rate"  # what a bad rate's error message calls it
    identity_rate: float = 0.0  # the rate at which the transform is the identity
    acting_rate: float = 0.5  # a rate at which it changes every selected leaf
    pytree_rates: bool = True  # rate may be a per-leaf pytree
    l1: bool = False

    @property
    def optimizer(self) -> bool:
        return self.reference is not None

    @property
    def public(self) -> str:
        """The name of the public factory: ``wdjax.<public>``."""
        head = self.id.split("-")[0]
        return "decoupled_weight_decay" if head == "decoupled" else head


def _anchor(params: Any) -> Any:
    return randomize(params, seed=99)


def _decoupled(**kw: Any) -> Make:
    return lambda r, m, p: wdjax.decoupled_weight_decay(r, m, **kw)


TRANSFORMS = [
    Row("add_l2_gradient", lambda r, m, p: wdjax.add_l2_gradient(r, m)),
    Row("decoupled-lr", _decoupled(learning_rate=LR)),
    Row("decoupled-lr-schedule", _decoupled(learning_rate=SCHED)),
    Row(
        "decoupled-schedule",
        _decoupled(learning_rate=SCHED, lr_coupling="schedule", max_learning_rate=LR),
    ),
    Row(
        "decoupled-corrected",
        _decoupled(learning_rate=SCHED, lr_coupling="corrected", max_learning_rate=LR),
    ),
    Row("decoupled-constant", _decoupled(lr_coupling="constant")),
    Row("decoupled-lr-cautious", _decoupled(learning_rate=LR, cautious=True)),
    Row("decoupled-constant-cautious", _decoupled(lr_coupling="constant", cautious=True)),
    Row("decay_toward", lambda r, m, p: wdjax.decay_toward(_anchor(p), r, m, learning_rate=LR)),
    Row(
        "decay_toward-cautious",
        lambda r, m, p: wdjax.decay_toward(_anchor(p), r, m, lr_coupling="constant", cautious=True),
    ),
    Row("l1_proximal", lambda r, m, p: wdjax.l1_proximal(r, m, learning_rate=LR)),
    Row("l1_proximal-schedule", lambda r, m, p: wdjax.l1_proximal(r, m, learning_rate=SCHED)),
    Row(
        "max_norm",
        lambda r, m, p: wdjax.max_norm(r, m),
        rate_name="max_value",
        identity_rate=1e4,  # no norm reaches it
        acting_rate=0.05,
        pytree_rates=False,
    ),
    Row(
        "max_norm-last-axis",
        lambda r, m, p: wdjax.max_norm(r, m, axis=-1),
        rate_name="max_value",
        identity_rate=1e4,
        acting_rate=0.05,
        pytree_rates=False,
    ),
]


def _optimizer(
    name: str, reference: Callable[[], optax.GradientTransformation], l1: bool = False, **kw
) -> Row:
    factory = getattr(wdjax, name)
    suffix = "".join(f"-{k}={v}" for k, v in kw.items() if k != "momentum")

    def make(r: Any, m: Any, p: Any) -> optax.GradientTransformation:
        return factory(LR, r, mask=m, **kw, **({"l1": r} if l1 else {}))

    return Row(
        name + suffix + ("-l1" if l1 else ""),
        make,
        reference=reference,
        rate_name="weight_decay",
        pytree_rates=False,
        l1=l1,
    )


def _adam(**kw: Any) -> Callable[[], optax.GradientTransformation]:
    return lambda: optax.adam(LR, **kw)


def _sgd(**kw: Any) -> Callable[[], optax.GradientTransformation]:
    return lambda: optax.sgd(LR, momentum=0.9, **kw)


def _lion() -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_lion(), optax.scale_by_learning_rate(LR))


OPTIMIZERS = [
    _optimizer("adamw", _adam()),
    _optimizer("adamw", _adam(), l1=True),
    _optimizer("adamw", _adam(nesterov=True), nesterov=True),
    _optimizer("adamw", _adam(), lr_coupling="schedule"),
    _optimizer("adamw", _adam(), cautious=True),
    _optimizer("adam_l2", _adam()),
    _optimizer("adam_l2", _adam(), l1=True),
    _optimizer("sgdw", _sgd(), momentum=0.9),
    _optimizer("sgdw", _sgd(), l1=True, momentum=0.9),
    _optimizer("sgdw", _sgd(nesterov=True), momentum=0.9, nesterov=True, cautious=True),
    _optimizer("sgd_l2", _sgd(), momentum=0.9),
    _optimizer("sgd_l2", _sgd(), l1=True, momentum=0.9),
    _optimizer("lionw", _lion),
    _optimizer("lionw", _lion, l1=True),
]
ROWS = TRANSFORMS + OPTIMIZERS


def _params(rows: list[Row], **marks: Any) -> list:
    return [pytest.param(r, id=r.id, **marks) for r in rows]


# A tree with kernels (selected by the default mask) and biases (not), and gradients.
PARAMS = randomize(
    {
        "dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
        "head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
    }
)
GRADS = like(PARAMS, scale=0.5)
STEPS = 2


def updates_of(
    row: Row, rate: Any, mask: Any = None, params: Any = PARAMS, grads: Any = GRADS, steps=STEPS
):
    """A transform's updates of one step; an optimizer's after ``steps`` steps."""
    tx = row.make(rate, mask, params)
    if row.optimizer:
        return run_steps(tx, grads, params, steps)[0]
    return tx.update(grads, tx.init(params), params)[0]


# ------------------------------------------------------------- identity at rate 0


@pytest.mark.parametrize("row", _params(ROWS))
def test_identity_at_rate_zero(row):
    """A transform at rate 0 passes the updates through bit for bit (a Python 0 by
    construction, a traced 0 by arithmetic); an optimizer at rate 0 is exactly its
    undecayed Optax chain."""
    if row.optimizer:
        expected = run_steps(row.reference(), GRADS, PARAMS, STEPS)[0]
        assert bits(updates_of(row, 0.0)) == bits(expected)
        # compiled, XLA may fuse the two programs differently: equal up to rounding
        traced = jax.jit(lambda r: updates_of(row, r))(jnp.float32(0.0))
        chex.assert_trees_all_close(traced, expected, rtol=1e-6, atol=1e-9)
        return
    rates = [row.identity_rate] + ([0] if row.identity_rate == 0 else [])
    for rate in rates:
        assert bits(updates_of(row, rate)) == bits(GRADS), rate
    traced = jax.jit(lambda r: updates_of(row, r))(jnp.float32(row.identity_rate))
    assert bits(traced) == bits(GRADS)


@settings(PROPERTY, max_examples=6)
@given(data=float_trees(min_ndim=2), zero=st.sampled_from([0, 0.0]))
def test_identity_at_rate_zero_on_random_trees(data, zero):
    """The same over random trees of float32/bfloat16/float16 leaves, all transforms in
    one compilation per example."""
    params, fresh = data
    grads = fresh(params)
    rows = [r for r in TRANSFORMS if r.identity_rate == 0]

    def all_updates(rate):
        return [updates_of(row, rate, None, params, grads) for row in rows]

    literal, traced = jax.jit(lambda r: (all_updates(zero), all_updates(r)))(jnp.float32(zero))
    for row, a, b in zip(rows, literal, traced, strict=True):
        assert bits(a) == bits(grads), row.id
        assert bits(b) == bits(grads), row.id


# ------------------------------------------------------------------------ masks


def _row_and_tree_kind() -> list:
    """Every transform on every kind of tree; the optimizers take turns (they cost more)."""
    kinds = sorted(TREE_KINDS)
    out = [pytest.param(r, k, id=f"{r.id}-{k}") for r in TRANSFORMS for k in kinds]
    out += [
        pytest.param(r, kinds[i % 3], id=f"{r.id}-{kinds[i % 3]}") for i, r in enumerate(OPTIMIZERS)
    ]
    return out


@pytest.mark.parametrize(("row", "tree_kind"), _row_and_tree_kind())
def test_masked_leaves_untouched(row, tree_kind):
    """On a linen dict, an ``nnx.State`` and an Equinox module, with the default mask
    (kernels, embeddings): the other leaves' updates are what they are without any decay, bit
    for bit, and every kernel's is changed."""
    params = TREE_KINDS[tree_kind]()
    grads = like(params, scale=0.5)
    chosen = masks.resolve(params, masks.DEFAULT)
    assert any(chosen) and not all(chosen)
    decayed = updates_of(row, row.acting_rate, masks.DEFAULT, params, grads)
    plain = updates_of(row, row.acting_rate, masks.NONE, params, grads)
    assert jax.tree.structure(decayed) == jax.tree.structure(params)  # same container
    if not row.optimizer:
        assert bits(plain) == bits(grads)  # NONE: nothing decayed
    # masks.flatten keeps the None leaves eqx.filter leaves (resolve gives them False)
    leaves = [masks.flatten(t)[0] for t in (decayed, plain)]
    for c, a, b in zip(chosen, *leaves, strict=True):
        assert (bits(a) != bits(b)) if c else (bits(a) == bits(b))


# ----------------------------------------------------------------------- dtypes


def _dtype_params() -> list:
    out = []
    for row in ROWS:
        out.append(pytest.param(row, jnp.float32, id=f"{row.id}-float32"))
        out.append(pytest.param(row, jnp.bfloat16, id=f"{row.id}-bfloat16"))
    return out


@pytest.mark.parametrize(("row", "dtype"), _dtype_params())
def test_dtype_and_shape_preserved(row, dtype):
    params, grads = astype(PARAMS, dtype), astype(GRADS, dtype)
    tx = row.make(row.acting_rate, masks.ALL, params)
    state = tx.init(params)
    chex.assert_tree_all_finite(state)
    updates = grads
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        chex.assert_tree_all_finite(updates)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_shapes_and_dtypes(params, grads)


# ----------------------------------------------------------------- traced rates


class TracedRatesTest(chex.TestCase):
    """``vmap`` over λ, under ``jit`` and without: each λ gives what it gives alone."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(r.id.replace("-", "_"), r) for r in ROWS])
    def test_vmap_over_the_rate_equals_separate_runs(self, row):
        # c·λ < 1 for every coupling (c = 1 at step 0 for "constant" and "schedule")
        lams = [0.0, 0.05, 0.5] if row.identity_rate == 0 else [0.05, 0.5, 1e4]
        swept = self.variant(jax.vmap(lambda r: updates_of(row, r, steps=1)))(jnp.asarray(lams))
        for i, lam in enumerate(lams):
            alone = updates_of(row, lam, steps=1)
            chex.assert_trees_all_close(
                jax.tree.map(lambda x, i=i: x[i], swept), alone, rtol=1e-6, atol=1e-7
            )
        assert bits(jax.tree.map(lambda x: x[-1], swept)) != bits(
            jax.tree.map(lambda x: x[0], swept)
        )  # λ mattered


# -------------------------------------------------------------------- bad rates

BAD_RATES = [
    pytest.param(-1e-3, "must be >= 0", id="negative"),
    pytest.param(float("nan"), "must be finite", id="nan"),
    pytest.param(float("inf"), "must be finite", id="inf"),
    pytest.param("0.1", "must be a real number", id="string"),
    pytest.param(True, "must be a real number", id="bool"),
]


@pytest.mark.parametrize(("bad", "msg"), BAD_RATES)
@pytest.mark.parametrize("row", _params(ROWS))
def test_bad_rates_raise_when_built(row, bad, msg):
    with pytest.raises(ValueError, match=f"{row.rate_name} {msg}"):
        row.make(bad, None, PARAMS)
    if row.pytree_rates:  # one bad leaf of a per-leaf rate tree
        with pytest.raises(ValueError, match=f"rate {msg}"):
            row.make({"dense": 0.1, "head": {"kernel": 0.1, "bias": bad}}, None, PARAMS)
    if row.l1:  # the l1 rate on its own
        with pytest.raises(ValueError, match=f"l1 {msg}"):
            getattr(wdjax, row.public)(LR, 0.1, l1=bad)
    if row.optimizer:
        with pytest.raises(ValueError, match=f"learning_rate {msg}"):
            getattr(wdjax, row.public)(bad, 0.1)


@pytest.mark.parametrize(("bad", "msg"), BAD_RATES)
def test_bad_group_rates_raise_when_built(bad, msg):
    with pytest.raises(ValueError, match=f"rate for 'head/\\*' {msg}"):
        wdjax.rates({"head/*": bad})


def test_the_table_covers_every_public_transform_and_optimizer():
    from wdjax.optimizers import OPTIMIZERS as REGISTERED

    transforms = {
        "add_l2_gradient",
        "decoupled_weight_decay",
        "decay_toward",
        "l1_proximal",
        "max_norm",
    }
    assert transforms | set(REGISTERED) <= set(wdjax.__all__)
    assert {r.public for r in TRANSFORMS} == transforms
    assert {r.public for r in OPTIMIZERS} == set(REGISTERED)
    assert {r.public for r in OPTIMIZERS if r.l1} == set(REGISTERED)  # each with l1 too
    decoupled = [r.id for r in TRANSFORMS if r.public == "decoupled_weight_decay"]
    assert {i.split("-")[1] for i in decoupled} == {"lr", "schedule", "corrected", "constant"}
    assert any(i.endswith("cautious") for i in decoupled)
    for row in ROWS:
        assert isinstance(row.make(0.1, None, PARAMS), optax.GradientTransformation)
