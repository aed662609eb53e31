"""Step-by-step parity with timm's own optimizers (``timm.optim``) under a learning-rate
schedule: timm's corrected weight decay (AdamC, ``corrected_weight_decay=True``:
``w ← w·(1 − λ·η_t²/η_max)``) is ``lr_coupling="corrected"`` with ``max_learning_rate=η_max``,
and timm's plain decoupled decay (``w ← w·(1 − λ·η_t)``) is ``lr_coupling="lr"``.

The same MLP, initial weights, batch sequence and MSE loss on both sides; each side computes
its own gradients from its own parameters; timm gets the schedule by setting ``group["lr"]``
before every step, as timm's schedulers do. Parameters are compared after every step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is needed for the timm parity tests (pip install 'wdjax[parity]')"
)

import optax  # noqa: E402
from helpers import max_rel_err, trajectory  # noqa: E402
from peers import load_timm, torch_trajectory  # noqa: E402

import wdjax  # noqa: E402
from wdjax import masks  # noqa: E402

STEPS = 40
LR_MAX, WD = 1e-2, 0.5
# Warm-up from 0.1·η_max to η_max, then cosine decay to 0.05·η_max: η_t²/η_max and η_t differ
# by up to 20×, so the corrected and the plain decay trajectories are far apart.
SCHEDULE = optax.warmup_cosine_decay_schedule(
    0.1 * LR_MAX, LR_MAX, warmup_steps=5, decay_steps=STEPS, end_value=0.05 * LR_MAX
)
RTOL = 1e-5  # float32 rounding only (torch and XLA round differently)


@pytest.fixture(scope="module")
def timm_optim() -> dict:
    """timm's ``AdamWLegacy`` and ``SGDW`` (the classes behind timm's ``adamw``/``adamc`` and
    ``sgdw``/``sgdc``), loaded without timm's package ``__init__``."""
    with load_timm("timm.optim.adamw") as adamw, load_timm("timm.optim.sgdw") as sgdw:
        return {"adamw": adamw.AdamWLegacy, "sgdw": sgdw.SGDW}


def timm_trajectory(make_optimizer, decay_biases: bool) -> dict:
    """Train a torch copy of `MLP0` with a timm optimizer for `STEPS` steps, in two
    param groups as timm's `param_groups_weight_decay` builds them, the learning rate set
    from `SCHEDULE` before each step as timm's schedulers do."""

    def groups(layers):
        weights, biases = [[getattr(m, k) for m in layers] for k in ("weight", "bias")]
        return make_optimizer(
            [
                {"params": weights, "weight_decay": WD},
                {"params": biases, "weight_decay": WD if decay_biases else 0.0},
            ]
        )

    def schedule(optimizer, t):
        for group in optimizer.param_groups:
            group["lr"] = float(SCHEDULE(t))

    return torch_trajectory(groups, STEPS, schedule)


def corrected(corrected_weight_decay: bool) -> dict:
    """wdjax's ``lr_coupling`` for timm's ``corrected_weight_decay`` flag."""
    if corrected_weight_decay:
        return {"lr_coupling": "corrected", "max_learning_rate": LR_MAX}
    return {"lr_coupling": "lr"}


@dataclasses.dataclass(frozen=True)
class Row:
    """A timm optimizer setting and its wdjax equivalent (``lr_coupling`` follows from
    ``corrected_weight_decay``)."""

    timm_class: str  # a key of the ``timm_optim`` fixture
    timm_kwargs: dict
    wdjax_optimizer: Callable[..., optax.GradientTransformation]
    wdjax_kwargs: dict
    decay_biases: bool  # timm: the bias group gets WD too (else 0); wdjax: the mask says it


CORRECTED = {"corrected_weight_decay": True}
ROWS = {
    "AdamWLegacy(corrected_weight_decay=True), weights only": Row(
        "adamw", CORRECTED, wdjax.adamw, {"mask": "*/kernel"}, False
    ),
    "AdamWLegacy(corrected_weight_decay=True), all params": Row(
        "adamw", CORRECTED, wdjax.adamw, {"mask": masks.ALL}, True
    ),
    "AdamWLegacy(corrected_weight_decay=False), weights only": Row(
        "adamw", {"corrected_weight_decay": False}, wdjax.adamw, {"mask": "*/kernel"}, False
    ),
    "SGDW(nesterov, corrected_weight_decay=True) [timm sgdc]": Row(
        "sgdw",
        CORRECTED | {"momentum": 0.9, "nesterov": True},
        wdjax.sgdw,
        {"mask": "*/kernel", "momentum": 0.9, "nesterov": True},
        False,
    ),
}


def wdjax_kwargs(row: Row) -> dict:
    return row.wdjax_kwargs | corrected(row.timm_kwargs["corrected_weight_decay"])


@pytest.mark.parametrize("row", list(ROWS))
def test_timm_matches_wdjax_step_by_step(row: str, timm_optim: dict) -> None:
    r = ROWS[row]
    theirs = timm_trajectory(
        lambda groups: timm_optim[r.timm_class](groups, lr=LR_MAX, foreach=False, **r.timm_kwargs),
        r.decay_biases,
    )
    wd_kwargs = wdjax_kwargs(r)
    make_wdjax = r.wdjax_optimizer
    if r.timm_class == "adamw":
        wd_kwargs["eps"] = 1e-8  # timm's default, and optax's: both add ε to √v̂
    ours = trajectory(make_wdjax(SCHEDULE, WD, **wd_kwargs), steps=STEPS)
    assert max_rel_err(ours, theirs) < RTOL
    # the comparison can tell the couplings apart: the other one is far off
    other = "lr" if wd_kwargs["lr_coupling"] == "corrected" else "corrected"
    wrong = wd_kwargs | {"lr_coupling": other, "max_learning_rate": LR_MAX}
    assert max_rel_err(trajectory(make_wdjax(SCHEDULE, WD, **wrong), steps=STEPS), theirs) > (
        100 * RTOL
    )


def test_timm_corrected_decay_multiplier(timm_optim: dict) -> None:
    """One parameter, zero gradient, momentum-free SGDW: timm shrinks it by exactly
    ``1 − λ·η_t²/η_max`` each step, as ``wdjax.sgdw(lr_coupling="corrected")`` does."""
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = timm_optim["sgdw"]([p], lr=LR_MAX, weight_decay=WD, corrected_weight_decay=True)
    expected = 1.0
    for t in range(STEPS):
        lr = float(SCHEDULE(t))
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = torch.zeros_like(p)
        opt.step()
        expected *= 1 - WD * lr**2 / LR_MAX
    np.testing.assert_allclose(p.item(), expected, rtol=1e-12)
    tx = wdjax.sgdw(SCHEDULE, WD, mask=masks.ALL, lr_coupling="corrected", max_learning_rate=LR_MAX)
    w = {"w": np.ones(1, np.float32)}
    ws = trajectory(tx, loss=lambda params, x, y: 0.0 * params["w"].sum(), steps=STEPS, params=w)
    np.testing.assert_allclose(ws["w"][-1, 0], expected, rtol=1e-5)
