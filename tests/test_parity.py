"""Step-by-step parity with PyTorch's optimizers over a 100-step training trajectory:
the same MLP, initial weights, batch sequence and MSE loss; max relative error 1e-5."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is needed for the parity tests (pip install 'wdjax[parity]')"
)

from helpers import max_rel_err, trajectory  # noqa: E402
from peers import torch_trajectory  # noqa: E402

import wdjax  # noqa: E402
from wdjax import masks  # noqa: E402

STEPS = 100
LR, WD = 1e-3, 0.1


def all_params(layers):
    return [p for layer in layers for p in layer.parameters()]


def groups(layers, weight_decay):
    """Torch param groups: weights decayed, biases not (what ``masks.default()`` selects)."""
    return [
        {"params": [layer.weight for layer in layers], "weight_decay": weight_decay},
        {"params": [layer.bias for layer in layers], "weight_decay": 0.0},
    ]


CASES = {
    "AdamW": (
        lambda: wdjax.adamw(LR, WD, mask=masks.ALL),
        lambda layers: torch.optim.AdamW(
            all_params(layers), lr=LR, weight_decay=WD, eps=1e-8, foreach=False
        ),
    ),
    "Adam(weight_decay)": (
        lambda: wdjax.adam_l2(LR, WD, mask=masks.ALL),
        lambda layers: torch.optim.Adam(
            all_params(layers), lr=LR, weight_decay=WD, eps=1e-8, foreach=False
        ),
    ),
    "SGD(weight_decay, momentum)": (
        lambda: wdjax.sgd_l2(0.05, WD, momentum=0.9, mask=masks.ALL),
        lambda layers: torch.optim.SGD(
            all_params(layers), lr=0.05, momentum=0.9, weight_decay=WD, foreach=False
        ),
    ),
    "AdamW param groups vs default mask": (
        lambda: wdjax.adamw(LR, WD),
        lambda layers: torch.optim.AdamW(groups(layers, WD), lr=LR, eps=1e-8, foreach=False),
    ),
}


@functools.cache
def trajectories(case: str) -> tuple[dict, dict]:
    """(wdjax, torch) params after each step, for one of ``CASES``."""
    ours, theirs = CASES[case]
    return trajectory(ours(), steps=STEPS), torch_trajectory(theirs, STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_step_by_step(case):
    ours, theirs = trajectories(case)
    assert max_rel_err(ours, theirs) <= 1e-5


def test_parity_is_not_vacuous():
    """Decaying the biases or not, or coupled vs decoupled decay, is far above the tolerance."""
    masked, _ = trajectories("AdamW param groups vs default mask")
    decoupled, torch_decoupled = trajectories("AdamW")
    _, torch_coupled = trajectories("Adam(weight_decay)")
    assert max_rel_err(masked, torch_decoupled) > 1e-4
    assert max_rel_err(decoupled, torch_coupled) > 1e-4
