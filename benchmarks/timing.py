"""Interleaved timing: contenders run in turn (A, B, A, B, ...) in one process, so
slow drift and bursts of load from other processes hit all of them alike."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

WARM_S = 0.15  # seconds of untimed work before a timed sample (see warm)


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, quartiles, min and max of per-call times (seconds)."""
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {
        "median_s": float(med),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "iqr_s": float(q3 - q1),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "rounds": int(a.size),
    }


def warm(call: Callable[[], Any], seconds: float) -> None:
    """``call()`` until ``seconds`` have passed, at least once: a contender back at its
    steady speed after the others' turns (how long that takes differs: after 0.4 s idle,
    XLA's 6-step MLP call ran at 31k img/s behind one untimed call, 45k behind six;
    ``torch.compile``'s at 40k behind one)."""
    end = time.perf_counter() + seconds
    call()
    while time.perf_counter() < end:
        call()


def interleaved(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    number: int = 1,
    warmup: int = 2,
    self_timed: bool = False,
    warm_s: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Time each contender ``rounds`` times, ``number`` calls per sample, interleaved.

    Each ``fn()`` must do one unit of work *and wait for it* (``block_until_ready``).
    Every contender is called ``warmup`` times first (compilation, caches). The order
    within a round rotates, so no contender always runs right after another one.
    ``self_timed``: each ``fn()`` returns the seconds its work took (a contender in
    another process times itself; what it does after, such as letting its threads
    settle, is not counted). ``warm_s``: a contender whose last sample took less runs
    untimed for that long (:func:`warm`) before its next one, so a sample is its steady
    speed, not its wake-up after the others' turns (self-timed contenders warm
    themselves). Returns ``{name: summarize(per-call seconds)}``."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn = contenders[name]
                last = samples[name][-1] * number if samples[name] else 0.0
                if warm_s and not self_timed and last < warm_s:
                    warm(fn, warm_s)
                t0 = time.perf_counter()
                own = 0.0
                for _ in range(number):
                    out = fn()
                    own += out if self_timed else 0.0
                took = own if self_timed else time.perf_counter() - t0
                samples[name].append(took / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: summarize(s) for n, s in samples.items()}


def ratio(
    results: Mapping[str, Mapping[str, Any]], num: str, den: str, key: str = "median_s"
) -> float:
    """``results[num][key] / results[den][key]``."""
    return float(results[num][key] / results[den][key])


def log(label: str, items: Mapping[str, Any], fmt: Callable[[Any], str]) -> None:
    """Print ``  label: name fmt(value), ...`` (progress on the console)."""
    print(f"  {label}: " + ", ".join(f"{k} {fmt(v)}" for k, v in items.items()), flush=True)
