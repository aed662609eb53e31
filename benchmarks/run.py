"""Run the wdjax benchmarks side by side with hand-written Optax and PyTorch.

    python -m benchmarks                  # full run (several minutes): writes
                                          # benchmarks/results/<device>-<date>.json and
                                          # benchmarks/RESULTS.md
    python -m benchmarks --quick          # smoke run (CI): small sizes, few rounds, results
                                          # to a temporary directory; RESULTS.md untouched
    python -m benchmarks --only overhead throughput --out /tmp/bench
    python -m benchmarks --render benchmarks/results/<run>.json   # RESULTS.md from a saved
                                          # run, nothing measured

Benchmarks (each runs its contenders interleaved in one process after warm-up and
compilation, and reports median, quartiles, min and max; see ``timing.py``). Each module
has ``run(cfg)`` (measure), ``summary(result)`` and ``render(result)`` (its rows of the
summary table and its section of RESULTS.md; ``report.py`` assembles them):

1. ``overhead`` (``bench_overhead.py``): the library's train step vs a hand-written
   ``optax.adamw(mask=...)`` step;
2. ``throughput`` (``bench_throughput.py``): images/s vs PyTorch eager and ``torch.compile``;
3. ``bandwidth`` (``bench_bandwidth.py``): AdamW + masked decay update, bytes/s vs an
   in-place copy and vs the same update as one fused C loop (``streams.c``, built with
   the system C compiler when there is one);
4. ``sweep`` (``sweep_vs_sequential.py``): ``wdjax.sweep`` vs the same runs one by one;
5. ``compile`` (``bench_compile.py``): compile time, recompilations when λ or η change;
6. ``cnn`` (``bench_cnn.py``): where the CNN's time goes on XLA:CPU;
7. ``checkpoint`` (``bench_checkpoint.py``): what verified saves and restores cost;
8. ``scale`` (``bench_scale.py``): the layout path on one device, member-sharded sweeps on
   8 simulated devices, async vs sync checkpoint stalls (in a child process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from typing import Any

from benchmarks import report

ALL = tuple(report.SECTIONS)
HERE = report.HERE


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and rounds of a run: the full run's by default; :func:`quick` for a smoke run.
    Per-model settings are keyed by model name ("mlp", "cnn")."""

    quick: bool = False
    torch_compile: bool = True
    models: tuple[str, ...] = ("mlp", "cnn")
    batch_size: int = 128
    scan_length: int = 6  # steps per lax.scan call (throughput, compile)
    overhead_rounds: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"mlp": 40, "cnn": 20}
    )
    overhead_number: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"mlp": 10, "cnn": 2}
    )
    throughput_rounds: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"mlp": 15, "cnn": 5}
    )
    bandwidth_sizes: tuple[int, ...] = (10_000_000, 100_000_000)
    bandwidth_rounds: int = 10
    compile_repeats: int = 2
    cnn_rounds: int = 10
    cnn_number: int = 3
    cnn_scan_length: int = 4
    checkpoint_params: int = 10_000_000
    checkpoint_rounds: int = 5
    scale_rounds: int = 45  # the layout ratio is ~1 with an IQR of ~8%: many rounds
    scale_scan: int = 19
    scale_ckpt_params: int = 10_000_000
    scale_ckpt_steps: int = 40
    scale_ckpt_every: int = 10

    def bandwidth_number(self, n: int) -> int:
        """Calls per timed sample for ``n`` parameters: about 20M parameters in all, 1 to 20."""
        return max(1, min(20, 20_000_000 // max(n, 1)))


def quick() -> Config:
    """The smoke run: the MLP only, small sizes, few rounds, no ``torch.compile``."""
    return Config(
        quick=True,
        torch_compile=False,
        models=("mlp",),
        batch_size=32,
        scan_length=2,
        overhead_rounds={"mlp": 3},
        overhead_number={"mlp": 2},
        throughput_rounds={"mlp": 3},
        bandwidth_sizes=(1 << 18,),
        bandwidth_rounds=3,
        compile_repeats=1,
        cnn_rounds=2,
        cnn_number=1,
        cnn_scan_length=2,
        checkpoint_params=1 << 16,
        checkpoint_rounds=2,
        scale_rounds=3,
        scale_scan=2,
        scale_ckpt_params=1 << 16,
        scale_ckpt_steps=4,
        scale_ckpt_every=2,
    )


def jsonable(x: Any) -> Any:
    """Plain JSON types; non-finite floats become strings ("nan", "inf")."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "size", 2) == 1:
        x = x.item()
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if hasattr(x, "tolist"):
        return jsonable(x.tolist())
    return str(x)


def measure(cfg: Config, only: tuple[str, ...], command: str) -> dict[str, Any]:
    """Run the benchmarks ``only``; a failure is recorded in its entry and the run goes on."""
    import jax

    from benchmarks import common

    env = common.environment()
    print(
        f"wdjax benchmarks ({'quick' if cfg.quick else 'full'}) on {env['device']}, "
        f"{env['cpu']}, {env['cpu_count']} cores, load {env['loadavg_start']}; "
        f"jax {jax.__version__}",
        flush=True,
    )
    meta = {
        **env,
        "command": command,
        "mode": "quick" if cfg.quick else "full",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    results: dict[str, Any] = {"meta": meta, "benchmarks": {}}
    t_all = time.perf_counter()
    for name in only:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            entry = report.section_module(name).run(cfg)
        except Exception as e:  # record it and go on with the others
            traceback.print_exc()
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        results["benchmarks"][name] = {**entry, "elapsed_s": time.perf_counter() - t0}
    meta["elapsed_s"] = time.perf_counter() - t_all
    meta["loadavg_end"] = common.loadavg()
    return results


def merged(path: str, partial: dict[str, Any]) -> dict[str, Any]:
    """The saved run at ``path`` with the sections of a partial (``--only``) run of the
    same machine and day in place of its own, each noted in ``meta["remeasured"]``."""
    with open(path) as f:
        saved = json.load(f)
    meta = partial["meta"]
    for name, entry in partial["benchmarks"].items():
        saved["benchmarks"][name] = entry
        saved["meta"].setdefault("remeasured", {})[name] = f"`{meta['command']}` at {meta['time']}"
    return saved


def keep_other_machine(markdown: str, slug: str, results_dir: str) -> str | None:
    """Before ``markdown`` (RESULTS.md) takes a run of machine ``slug``, keep its table of
    another machine as ``results_dir/<the run it cites>.md``, which the new report links:
    one table per machine. The path kept, or None (same machine, or nothing to keep)."""
    if not os.path.exists(markdown):
        return None
    with open(markdown) as f:
        text = f.read()
    cited = re.search(r"^\* results: `([^`]+)\.json`", text, re.M)
    name = os.path.basename(cited.group(1)) if cited else ""
    if not name or name.startswith(slug + "-"):
        return None
    kept = os.path.join(results_dir, name + ".md")
    with open(kept, "w") as f:
        f.write(text)
    return kept


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: small sizes, few rounds, no RESULTS.md"
    )
    p.add_argument(
        "--only", nargs="+", choices=ALL, default=list(ALL), help="run these benchmarks only"
    )
    p.add_argument(
        "--out",
        default=None,
        help="results directory (default: benchmarks/results; --quick: a temp dir)",
    )
    p.add_argument(
        "--markdown",
        default=None,
        help="where to write the report (default: benchmarks/RESULTS.md; --quick or a subset "
        "with --only: none)",
    )
    p.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="measure nothing: render the report of this saved run (to --markdown)",
    )
    p.add_argument(
        "--no-torch-compile", action="store_true", help="skip torch.compile (slow to compile)"
    )
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for PyTorch's OpenMP threads, set before torch is imported "
        "(default PASSIVE: with ACTIVE, PyTorch's spinning threads collapse when other "
        "processes load the cores; '' leaves the environment alone)",
    )
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        results["meta"]["json_path"] = args.render
        markdown = args.markdown or os.path.join(HERE, "RESULTS.md")
    else:
        if args.omp_wait_policy and "torch" not in sys.modules:
            os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
        cfg = quick() if args.quick else Config(torch_compile=not args.no_torch_compile)
        command = "python -m benchmarks" + ("" if not argv else " " + shlex.join(argv))
        # plain JSON types from here on, so RESULTS.md is the render of the saved JSON
        results = jsonable(measure(cfg, tuple(args.only), command))
        out_dir = args.out or (
            tempfile.mkdtemp(prefix="wdjax-bench-") if cfg.quick else os.path.join(HERE, "results")
        )
        os.makedirs(out_dir, exist_ok=True)
        env = results["meta"]
        path = os.path.join(
            out_dir, f"{env['device_slug']}-{env['date']}{'-quick' if cfg.quick else ''}.json"
        )
        subset = set(args.only) != set(ALL)  # a partial run never overwrites RESULTS.md
        if subset and os.path.exists(path):
            results = merged(path, results)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        results["meta"]["json_path"] = path
        default = None if cfg.quick or subset else os.path.join(HERE, "RESULTS.md")
        markdown = args.markdown or default
    text = report.render(results)
    if markdown:
        slug = results["meta"]["device_slug"]
        kept = keep_other_machine(markdown, slug, os.path.join(HERE, "results"))
        if kept:
            print(f"kept the other machine's table: {kept}")
            text = report.render(results)  # now with a link to it
        with open(markdown, "w") as f:
            f.write(text)
    print(report.summary(results))
    print(
        f"results: {results['meta']['json_path']}" + (f"; report: {markdown}" if markdown else "")
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
