"""The benchmark runner and its report: a quick run (``python -m benchmarks --quick``) into a
temp dir, and every section of RESULTS.md rendered from the run it cites.

Nothing asserts a time: the quick run checks that every benchmark produced its entries with
finite numbers, and that the report it writes has each section with its table."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from benchmarks import report, run

RESULTS_MD = os.path.join(report.HERE, "RESULTS.md")
META = {
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


def _sections(text: str) -> dict[str, str]:
    """``{heading: body}`` of the report's ``## `` sections."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _has_table(body: str, head: list[str]) -> None:
    line = "| " + " | ".join(head) + " |"
    assert line in body, (line, body)
    assert "|---|" in body


def _cited_run() -> tuple[str, dict]:
    """The results JSON RESULTS.md names, and its contents."""
    with open(RESULTS_MD) as f:
        path = re.search(r"^\* results: `([^`]+)`", f.read(), re.M).group(1)
    path = os.path.join(os.path.dirname(report.HERE), path)
    with open(path) as f:
        return path, json.load(f)


@pytest.mark.slow
def test_quick_run(tmp_path):
    pytest.importorskip("torch")
    md_before = os.path.getmtime(RESULTS_MD)
    markdown = tmp_path / "RESULTS.md"
    results = run.main(["--quick", "--out", str(tmp_path), "--markdown", str(markdown)])
    assert os.path.getmtime(RESULTS_MD) == md_before  # the repo's report is left alone

    (saved,) = tmp_path.glob("*.json")
    saved = json.loads(saved.read_text())
    assert saved["meta"]["mode"] == "quick"
    for key in ("jax", "jaxlib", "optax", "flax", "torch"):
        assert saved["meta"]["versions"][key]

    b = results["benchmarks"]
    assert list(b) == list(report.SECTIONS)
    for name, entry in b.items():
        assert entry.get("status") != "error", (name, entry)
        _all_finite(entry)

    mlp = b["overhead"]["models"]["mlp"]
    for c in ("optax", "wdjax_optimizer_minimal", "wdjax_step", "wdjax_step_weight_metrics"):
        _timing(mlp["contenders"][c])
    assert mlp["ratios"]["wdjax_step/optax"] > 0

    tp = b["throughput"]["models"]["mlp"]
    for c in ("jax_scan", "torch_eager_default", "torch_eager_passive"):  # quick: MLP only
        assert tp["contenders"][c]["images_per_s"] > 0
        assert 0 < tp["contenders"][c]["fraction_of_peak"] < 1  # below the measured matmul peak
    assert tp["ratio_library"] > 0
    assert set(tp["peak"]) == {"peak_xla", "peak_torch"}  # timed in the contenders' rounds
    for r in tp["peak"].values():
        _timing(r)
        assert r["rounds"] == tp["contenders"]["jax_scan"]["rounds"]
    assert tp["peak_gflops"] == max(r["gflops"] for r in tp["peak"].values())

    (size,) = b["bandwidth"]["sizes"].values()
    for c in ("wdjax_adamw", "optax_adamw", "same_streams", "copy"):
        assert size["contenders"][c]["GB_per_s"] > 0
    assert size["ratios"]["wdjax_adamw/copy"] > 0 and size["ratios"]["same_streams/copy"] > 0
    # XLA's count cannot be below the bytes counted (the scalars aside)
    assert size["xla_bytes_per_param"]["wdjax_adamw"] >= 27.9
    if size["native_skipped"] is None:  # the fused C loops ran beside the XLA contenders
        for c in ("native_memcpy", "native_same_streams", "native_adamw"):
            assert size["contenders"][c]["GB_per_s"] > 0
    else:
        assert "native_adamw" not in size["contenders"] and size["native_skipped"]

    r = b["sweep"]["result"]
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

    sc = b["scale"]
    assert sc["devices"] == 8  # the child process had the simulated mesh
    for side, names in (
        ("layout", ("no_layout", "one_device_layout")),
        ("sweep", ("one_device", "members_8")),
    ):
        for c in names:
            _timing(sc[side]["contenders"][c])
    for mode in ("async", "sync"):
        _timing(sc["checkpoint"]["modes"][mode]["save_step"])

    # the report it wrote: the header, the summary and every section with its table
    text = markdown.read_text()
    assert text.startswith("# wdjax benchmarks") and str(tmp_path) in text
    sections = _sections(text)
    assert list(sections) == ["Summary"] + [report.section_module(n).TITLE for n in report.SECTIONS]
    _has_table(sections["Summary"], report.SUMMARY_HEAD)
    for body in list(sections.values())[1:]:
        assert "|---|" in body


# benchmarks newer than the cited full run: each renders from its own saved run
OWN_RUNS = {
    "checkpoint": "cpu-intel-xeon-2c-2026-11-24-checkpoint.json",
    "scale": "cpu-intel-xeon-2c-2026-11-24-scale.json",
}


def test_each_section_renders_its_table():
    """Every module renders its section of the cited full run: heading, table, summary rows."""
    _, results = _cited_run()
    heads = {
        "overhead": ["contender", "median ms", "IQR ms", "min ms", "max ms", "rounds", "× optax"],
        "throughput": ["contender", "images/s (median)", "IQR", "best round", "rounds", "GFLOP/s"],
        "bandwidth": ["contender", "median ms", "IQR ms", "min ms", "max ms", "rounds"],
        "sweep": ["contender", "median s", "IQR s", "min s", "max s", "rounds"],
        "compile": ["model", "function", "trace+lower s", "compile s", "total s"],
        "cnn": ["piece", "implementation", "median ms", "IQR ms", "min ms", "max ms"],
        "checkpoint": ["contender", "median ms", "IQR ms", "min ms", "max ms", "rounds"],
        "scale": ["saves", "step median ms", "step with a save, median ms", "slowest step ms"],
    }
    assert set(heads) == set(report.SECTIONS)
    for name, file in OWN_RUNS.items():
        with open(os.path.join(report.HERE, "results", file)) as f:
            results["benchmarks"][name] = json.load(f)["benchmarks"][name]
    for name, head in heads.items():
        mod = report.section_module(name)
        text = mod.render(results["benchmarks"][name])
        assert text.startswith(f"## {mod.TITLE}\n\n"), name
        assert "\n## " not in text, name  # one section, its own subsections only
        line = "| " + " | ".join(head)
        assert line in text, (name, line)
        for row in mod.summary(results["benchmarks"][name]):
            assert len(row) == len(report.SUMMARY_HEAD), row
    assert len(report.summary_rows(results)) >= len(report.SECTIONS) - 1  # cnn has no target


def test_results_md_is_the_render_of_the_run_it_cites():
    """RESULTS.md is exactly what the renderer makes of the JSON it cites: after a change to a
    ``render``, regenerate it with ``python -m benchmarks --render <that JSON>``."""
    path, results = _cited_run()
    results["meta"]["json_path"] = path
    with open(RESULTS_MD) as f:
        assert report.render(results) == f.read()


def test_failed_and_missing_sections():
    """A failed benchmark renders as its heading and the error; a missing one not at all."""
    text = report.render(
        {"meta": META, "benchmarks": {"overhead": {"status": "error", "error": "x"}}}
    )
    sections = _sections(text)
    assert text.startswith("# wdjax benchmarks")
    assert list(sections) == ["Summary", report.section_module("overhead").TITLE]
    assert "Failed: `x`" in sections[report.section_module("overhead").TITLE]
    _has_table(sections["Summary"], report.SUMMARY_HEAD)
    assert report.summary_rows({"meta": META, "benchmarks": {}}) == []


@pytest.mark.parametrize(
    "break_it, why",
    [
        (lambda mp, bb: mp.setattr(bb.shutil, "which", lambda name: None), "no C compiler"),
        (lambda mp, bb: mp.setattr(bb, "NATIVE_FLAGS", ("-no-such-flag",)), "failed: "),
        (lambda mp, bb: mp.setattr(bb, "NATIVE_SRC", "/nonexistent/streams.c"), "failed: "),
        (lambda mp, bb: mp.setattr(bb.jax, "default_backend", lambda: "gpu"), "JAX runs on gpu"),
    ],
    ids=["no compiler", "bad flags", "no source", "jax off the cpu"],
)
def test_the_fused_c_loops_say_why_they_did_not_run(monkeypatch, break_it, why):
    """Without a working C compiler the bandwidth section runs the XLA contenders alone and
    records why the fused C loops did not run."""
    from benchmarks import bench_bandwidth

    break_it(monkeypatch, bench_bandwidth)
    with bench_bandwidth.native(1024, 1024) as (kernels, skipped):
        assert kernels == {} and why in skipped


def test_the_fused_c_loops_run_each_kernel_when_a_compiler_is_there():
    from benchmarks import bench_bandwidth

    with bench_bandwidth.native(1024, 2048) as (kernels, skipped):
        if skipped is not None:
            pytest.skip(f"fused C loops unavailable here: {skipped}")
        assert sorted(kernels) == ["native_adamw", "native_memcpy", "native_same_streams"]
        for run_kernel in kernels.values():
            run_kernel()  # raises if the child does not answer "ok"


@pytest.mark.parametrize("self_timed", [False, True])
def test_interleaved_calls_every_contender_and_times_it(self_timed):
    """Each contender runs warmup + rounds × number times; a self-timed one reports its
    own seconds (here a fixed 0.25), a plain one its wall time."""
    from benchmarks.timing import interleaved

    calls = {"a": 0, "b": 0}

    def contender(name):
        def fn():
            calls[name] += 1
            return 0.25 if self_timed else None

        return fn

    res = interleaved({k: contender(k) for k in calls}, rounds=3, number=2, warmup=1)
    assert calls == {"a": 7, "b": 7}
    if self_timed:
        res = interleaved({"a": contender("a")}, rounds=2, warmup=0, self_timed=True)
        assert res["a"]["median_s"] == 0.25
    else:
        assert 0 < res["a"]["median_s"] < 0.01


def test_a_partial_run_replaces_its_sections_of_the_saved_run_and_says_so(tmp_path):
    """`--only` on the machine and day of a saved full run replaces those sections in its
    JSON and notes each in `meta.remeasured`; every other section and the meta stay."""
    path = tmp_path / "run.json"
    saved = {"meta": {**META, "remeasured": {"sweep": "why"}}, "benchmarks": {"a": 1, "b": 2}}
    path.write_text(json.dumps(saved))
    partial_meta = {**META, "command": "python -m benchmarks --only b", "time": "later"}
    out = run.merged(str(path), {"meta": partial_meta, "benchmarks": {"b": 3}})
    assert out["benchmarks"] == {"a": 1, "b": 3}
    assert out["meta"]["time"] == "t" and out["meta"]["remeasured"] == {
        "sweep": "why",
        "b": "`python -m benchmarks --only b` at later",
    }


def _torch_with_cuda(monkeypatch, cuda: bool) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


@pytest.mark.parametrize(
    "backend, setup, device, why",
    [
        ("cpu", lambda mp: None, "cpu", ""),
        ("gpu", lambda mp: _torch_with_cuda(mp, True), "cuda", ""),
        ("gpu", lambda mp: _torch_with_cuda(mp, False), None, "no CUDA"),
        ("tpu", lambda mp: None, None, "torch_xla"),
        ("cpu", lambda mp: mp.setattr("benchmarks.common.torch_available", lambda: False), None,
         "not installed"),
    ],
    ids=["cpu", "gpu with cuda", "gpu, cpu-only torch", "tpu", "no torch"],
)  # fmt: skip
def test_the_pytorch_peer_runs_beside_jax_or_says_why_not(monkeypatch, backend, setup, device, why):
    """PyTorch runs where JAX runs (CPU beside XLA:CPU, CUDA beside a JAX GPU); where it has
    no fair place, no peer, and the reason."""
    from benchmarks import common

    pytest.importorskip("torch")
    monkeypatch.setattr(common.jax, "default_backend", lambda: backend)
    setup(monkeypatch)
    got, reason = common.torch_device()
    assert got == device and why in reason and bool(reason) == (device is None)


@pytest.mark.slow
def test_off_the_cpu_the_sections_keep_to_the_device(monkeypatch):
    """On an accelerator (JAX's backend faked here) the CPU-only pieces step aside with
    their reason: section 6 is not run, the bandwidth section times the device's update
    and copy only (no NumPy copy, no C loops), and section 2 runs without a PyTorch peer
    where there is none."""
    from benchmarks import bench_bandwidth, bench_cnn, bench_throughput, common

    cfg = run.quick()
    monkeypatch.setattr(common.jax, "default_backend", lambda: "tpu")
    cnn = bench_cnn.run(cfg)
    assert "XLA:CPU" in cnn["skipped"] and "Not run" in bench_cnn.render(cnn)
    assert bench_cnn.summary(cnn) == []

    bw = bench_bandwidth.run(cfg)
    (size,) = bw["sizes"].values()
    assert set(size["contenders"]) == {"wdjax_adamw", "optax_adamw", "same_streams", "copy"}
    assert "JAX runs on tpu" in size["native_skipped"]
    assert "XLA:CPU" not in bench_bandwidth._xla_cpu_note(bw["backend"], size)

    tp = bench_throughput.run(cfg)
    assert set(tp["models"]["mlp"]["contenders"]) == {"jax_scan"}
    assert "No PyTorch contender in this run: no PyTorch peer on tpu" in bench_throughput.render(tp)


@pytest.mark.parametrize(
    "cited, slug, kept",
    [
        ("results/cpu-x-2c-2026-01-01.json", "gpu-nvidia-h100", "cpu-x-2c-2026-01-01.md"),
        ("results/cpu-x-2c-2026-01-01.json", "cpu-x-2c", None),
        (None, "gpu-nvidia-h100", None),
    ],
    ids=["another machine", "same machine", "no report yet"],
)  # fmt: skip
def test_a_run_of_another_machine_keeps_the_old_table(tmp_path, cited, slug, kept):
    """RESULTS.md keeps one table per machine: before it takes another machine's run, the
    old report is saved under the name of the run it cites; the same machine's run simply
    replaces it."""
    markdown = tmp_path / "RESULTS.md"
    if cited:
        markdown.write_text(f"# wdjax benchmarks\n\n* results: `{cited}`\n")
    got = run.keep_other_machine(str(markdown), slug, str(tmp_path))
    assert got == (str(tmp_path / kept) if kept else None)
    if kept:
        assert (tmp_path / kept).read_text() == markdown.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {*([kept] if kept else []), *(["RESULTS.md"] if cited else [])}
    )


@pytest.mark.slow
def test_the_width_scan_times_its_ceilings_in_the_same_rounds():
    """Each width's roofline denominators, the 2048² matmul (the peak: its best round) and
    the hidden layer's three matmuls, are contenders of that width's rounds, not one
    measurement apart; the fractions are the epochs' median FLOP/s over that peak."""
    from benchmarks import sweep_vs_sequential as sw
    from wdjax.lab import data

    ds = data.load("digits")
    scan = sw.width_scan(ds, members=2, lr=1e-3, batch_size=256, widths=(8,), rounds=2)
    (row,) = scan["rows"]
    for c in ("vmap", "map", "sequential", "peak", "matmuls"):
        _timing(row[c])
        assert row[c]["rounds"] == 2
    assert scan["peak_gflops"] == pytest.approx(2 * 2048**3 / row["peak"]["min_s"] / 1e9)
    for k in ("fraction_of_peak", "fraction_of_peak_map", "fraction_of_peak_sequential",
              "matmuls_fraction_of_peak"):  # fmt: skip
        assert row[k] > 0
    assert row["fraction_of_peak"] / row["fraction_of_peak_sequential"] == pytest.approx(
        row["sequential"]["median_s"] / row["vmap"]["median_s"]
    )
