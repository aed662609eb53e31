"""Smoke test of the benchmark runner: ``python -m benchmarks --quick`` in a temp dir.

Asserts that every benchmark produced its entries with finite numbers; nothing asserts a
time. ``RESULTS.md`` is not touched in quick mode."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("torch")

from benchmarks import run  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(run.HERE), "benchmarks", "RESULTS.md")


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def _all_finite(tree):
    bad = [(p, x) for p, x in _numbers(tree) if not math.isfinite(x)]
    assert not bad, bad


def _timing(entry):
    for key in ("median_s", "q1_s", "q3_s", "min_s", "max_s"):
        assert entry[key] > 0, (key, entry)
    assert entry["min_s"] <= entry["median_s"] <= entry["max_s"]
    assert entry["rounds"] >= 1


@pytest.mark.slow
def test_quick_run(tmp_path):
    md_before = os.path.getmtime(RESULTS_MD) if os.path.exists(RESULTS_MD) else None
    results = run.main(["--quick", "--out", str(tmp_path)])
    if md_before is not None:
        assert os.path.getmtime(RESULTS_MD) == md_before  # --quick leaves RESULTS.md alone
    else:
        assert not os.path.exists(RESULTS_MD)

    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["meta"]["mode"] == "quick"
    for key in ("jax", "jaxlib", "optax", "flax", "torch"):
        assert saved["meta"]["versions"][key]

    b = results["benchmarks"]
    for name in ("overhead", "throughput", "bandwidth", "sweep", "compile", "cnn"):
        assert name in b, name
        assert b[name].get("status") != "error", b[name]
        _all_finite(b[name])

    mlp = b["overhead"]["models"]["mlp"]
    for c in ("optax", "wdjax_optimizer_minimal", "wdjax_step", "wdjax_step_no_weight_metrics"):
        _timing(mlp["contenders"][c])
    assert mlp["ratios"]["wdjax_step/optax"] > 0

    tp = b["throughput"]["models"]["mlp"]
    for c in ("jax_step", "jax_scan", "torch_eager"):  # quick mode: MLP only
        assert tp["contenders"][c]["images_per_s"] > 0
    assert tp["ratio_library"] > 0

    (size,) = b["bandwidth"]["sizes"].values()
    for c in ("wdjax_adamw", "optax_adamw", "copy"):
        assert size["contenders"][c]["GB_per_s"] > 0
    assert size["ratios"]["wdjax_adamw/copy"] > 0

    sweep = b["sweep"]
    assert sweep["status"] == "ok", sweep
    r = sweep["result"]
    for side, names in (("user", ("sweep", "fit_calls")), ("warm", ("sweep", "sequential"))):
        for c in names:
            _timing(r[side][c])
    assert r["ratio_user"] > 0 and r["ratio_warm"] > 0
    assert max(r["max_param_diff"].values()) < 1e-4

    comp = b["compile"]
    assert comp["models"]["mlp"]["wdjax_step"]["compile_s"] > 0
    rc = comp["recompilation"]
    assert rc["wdjax_set_hyperparams_recompiles"] == 0  # a count, not a time
    assert rc["optax_recreated_recompiles"] == rc["changes"]

    cnn = b["cnn"]
    (pool,) = cnn["components"].values()  # quick mode: the max-pool only
    for c in ("reduce_window", "wdjax_ops", "torch"):
        _timing(pool[c])
    (scan,) = cnn["in_scan"].values()
    for c in ("lax_autodiff", "wdjax_ops"):
        _timing(scan[c])


def test_report_renders_without_a_run():
    """The Markdown report renders from a results dict with failed / missing sections."""
    from benchmarks import report

    meta = {
        "command": "python -m benchmarks",
        "mode": "full",
        "time": "t",
        "device": "cpu",
        "cpu": "c",
        "cpu_count": 2,
        "jax_devices": 1,
        "versions": dict.fromkeys(
            ("jax", "jaxlib", "optax", "flax", "torch", "numpy", "python", "wdjax"), "0"
        ),
        "torch_threads": 2,
        "xla_flags": "",
        "loadavg_start": None,
    }
    text = report.render(
        {"meta": meta, "benchmarks": {"overhead": {"status": "error", "error": "x"}}}, before={}
    )
    assert "# wdjax benchmarks" in text and "Failed: `x`" in text
