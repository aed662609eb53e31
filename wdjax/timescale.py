"""λ as a timescale, and moving λ across scale.

Decoupled decay shrinks the weights by `(1 − c_t·λ)` each step, so they are an
exponential moving average of the updates with a timescale of

```text
τ_iter = 1/(c·λ) steps,     τ_epoch = τ_iter·B/D = τ_iter / steps_per_epoch epochs
```

(`c` the coupling multiplier: η for `lr_coupling="lr"`, `η_t/η_max` for
`"schedule"`, 1 for `"constant"`; averaged over the run when it varies). Wang &
Aitchison (ICML 2025) report that the best `τ_epoch` is roughly constant across model
and dataset size; Bergsma et al. ("Power Lines", 2025) find the best λ proportional to
the batch size at fixed model and data. [`timescale`][wdjax.timescale.timescale] reports
`τ_iter`, `τ_epoch`, `τ` as a fraction of the run and the total shrinkage `Σ c_t·λ` of a
configuration; [`rate_for_timescale`][wdjax.timescale.rate_for_timescale] gives the λ
of a chosen timescale; [`transfer`][wdjax.timescale.transfer] maps a λ to another
configuration under a named rule.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Literal

import numpy as np

from wdjax.transforms import multiplier
from wdjax.types import Coupling, ScalarOrSchedule


@dataclasses.dataclass(frozen=True)
class Timescale:
    """What a decoupled decay λ means for a run (see the module docstring)."""

    tau_iter: float  # steps
    tau_epoch: float  # epochs
    tau_fraction: float  # of the run's steps
    total_shrinkage: float  # Σ_t c_t·λ
    factor_first: float  # c_0·λ
    factor_last: float  # c_{T−1}·λ


def _mean_multiplier(
    learning_rate: ScalarOrSchedule,
    coupling: Coupling,
    max_learning_rate: float | None,
    total_steps: int,
) -> tuple[float, float, float]:
    """Mean, first and last of `c_t` over `total_steps` steps."""
    c = multiplier(coupling, learning_rate, max_learning_rate)
    values = np.asarray([float(c(np.int32(t))) for t in range(total_steps)], np.float64)
    return float(values.mean()), float(values[0]), float(values[-1])


def _check_run(steps_per_epoch: int, total_steps: int) -> None:
    if not (steps_per_epoch >= 1 and total_steps >= 1):
        raise ValueError(
            f"need steps_per_epoch >= 1 and total_steps >= 1, got {steps_per_epoch}, {total_steps}"
        )


def timescale(
    rate: float,
    *,
    learning_rate: ScalarOrSchedule,
    steps_per_epoch: int,
    total_steps: int,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
    warn: bool = True,
) -> Timescale:
    """`τ_iter = 1/(c̄·λ)`, `τ_epoch`, `τ` as a fraction of the run and `Σ c_t·λ`, with
    `c̄` the mean coupling multiplier over the run. Warns (`RuntimeWarning`) when
    `τ_epoch < 1` (the weights forget within an epoch) or `τ_iter` exceeds the run
    (the decay barely acts)."""
    _check_run(steps_per_epoch, total_steps)
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"a timescale needs λ > 0 and finite, got {rate}")
    mean, first, last = _mean_multiplier(learning_rate, lr_coupling, max_learning_rate, total_steps)
    tau = 1.0 / (mean * rate)
    out = Timescale(
        tau, tau / steps_per_epoch, tau / total_steps, mean * rate * total_steps,
        first * rate, last * rate,
    )  # fmt: skip
    if warn and out.tau_epoch < 1:
        warnings.warn(
            f"τ_epoch = {out.tau_epoch:.3g}: the decay forgets within one epoch "
            f"(τ_iter = {tau:.3g} steps, {steps_per_epoch} steps an epoch)",
            RuntimeWarning,
            stacklevel=2,
        )
    elif warn and out.tau_fraction > 1:
        warnings.warn(
            f"τ_iter = {tau:.3g} steps is longer than the run ({total_steps} steps): the "
            f"decay shrinks the weights by only Σc·λ = {out.total_shrinkage:.3g} in all",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def rate_for_timescale(
    tau: float,
    *,
    unit: Literal["epochs", "fraction", "steps"] = "epochs",
    learning_rate: ScalarOrSchedule,
    steps_per_epoch: int,
    total_steps: int,
    lr_coupling: Coupling = "lr",
    max_learning_rate: float | None = None,
) -> float:
    """The λ whose timescale is `tau` (in epochs, as a fraction of the run, or in
    steps): `λ = 1/(c̄·τ_iter)`."""
    _check_run(steps_per_epoch, total_steps)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"a timescale must be > 0 and finite, got {tau}")
    scale = {"epochs": steps_per_epoch, "fraction": total_steps, "steps": 1}
    if unit not in scale:
        raise ValueError(f"unit must be one of {sorted(scale)}, got {unit!r}")
    mean, _, _ = _mean_multiplier(learning_rate, lr_coupling, max_learning_rate, total_steps)
    return 1.0 / (mean * tau * scale[unit])


RULES = {
    "constant_tau_epoch": "Wang & Aitchison, ICML 2025: τ_epoch = B/(c·λ·D) kept constant",
    "batch": "Bergsma et al., 2025 ('Power Lines'): λ ∝ batch size at fixed model and data",
    "width_mup": "constant τ under μP (η ∝ 1/width): λ ∝ width",
    "width_sqrt": "Fan et al., 2025: λ ∝ √width",
}


def transfer(
    rate: float, *, rule: str, source: Mapping[str, float], target: Mapping[str, float]
) -> float:
    """λ for `target` from the λ found for `source` under `rule` (see
    [`RULES`][wdjax.timescale.RULES]). The configurations name what the rule reads:
    `constant_tau_epoch`: `c` (the coupling multiplier, η for `lr_coupling="lr"`),
    `batch_size`, `dataset_size`; `batch`: `batch_size`; `width_*`: `width`."""
    needs = {
        "constant_tau_epoch": ("c", "batch_size", "dataset_size"),
        "batch": ("batch_size",),
        "width_mup": ("width",),
        "width_sqrt": ("width",),
    }
    if rule not in needs:
        raise ValueError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
    for side, config in (("source", source), ("target", target)):
        missing = [k for k in needs[rule] if not config.get(k, 0) > 0]
        if missing:
            raise ValueError(f"rule {rule!r} needs {side} {', '.join(missing)} > 0")
    a, b = source, target
    if rule == "constant_tau_epoch":
        return (
            rate
            * (a["c"] / b["c"])
            * (b["batch_size"] / a["batch_size"])
            * (a["dataset_size"] / b["dataset_size"])
        )
    if rule == "batch":
        return rate * b["batch_size"] / a["batch_size"]
    if rule == "width_mup":
        return rate * b["width"] / a["width"]
    return rate * math.sqrt(b["width"] / a["width"])
