"""Summaries of repeated runs and the choice of a setting from them.

A *setting* is one point of a hyperparameter grid, a dict that carries its own
hyperparameters by name (`{"weight_decay": 1e-3, "learning_rate": 1e-2, ...}`); its
`r` runs (seeds × folds) are summarized per final metric `m` by the mean `x̄`,
the sample standard deviation `s` and the standard error `s/√r`, stored as `m_mean`,
`m_std` and `m_se`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

Select = Literal["best", "one_se"]
SELECTS: tuple[str, ...] = ("best", "one_se")


def summarize(final: Mapping[str, np.ndarray], runs: np.ndarray) -> dict[str, Any]:
    """`n` runs (selected by the bool mask `runs`) and, for each final metric, its
    mean `x̄`, sample standard deviation `s` (0 for one run) and standard error `s/√n`."""
    n = int(np.sum(runs))
    out: dict[str, Any] = {"n": n}
    for k, v in final.items():
        std = float(np.std(v[runs], ddof=1)) if n > 1 else 0.0
        out |= {
            f"{k}_mean": float(np.mean(v[runs])),
            f"{k}_std": std,
            f"{k}_se": std / math.sqrt(n),
        }
    return out


def select_setting(
    settings: Sequence[Mapping[str, Any]],
    key: str,
    *,
    maximize: bool,
    select: Select = "best",
    names: Sequence[str] = ("weight_decay",),
    along: str = "weight_decay",
) -> int:
    """Index of the chosen setting by the mean of metric `key` (NaN never wins).

    `"best"`: the best mean. `"one_se"`: among the settings that share the best one's
    other hyperparameters (those in `names` but `along`), the largest `along` (λ:
    the most regularized) whose mean is within one standard error of the best,
    `score ≥ score_best − se_best`."""
    mean = np.array([s[f"{key}_mean"] for s in settings], float)
    score = np.where(np.isnan(mean), -np.inf, mean if maximize else -mean)
    best = int(np.argmax(score))
    if select == "best":
        return best
    se = settings[best][f"{key}_se"]

    def rest(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: s[k] for k in names if k != along}

    near = [
        i
        for i, s in enumerate(settings)
        if score[i] >= score[best] - se and rest(s) == rest(settings[best])
    ]
    return max(near, key=lambda i: (settings[i][along], score[i]))
