"""Run the wdjax benchmarks side by side with hand-written Optax and PyTorch.

    python -m benchmarks                  # full run (several minutes): writes
                                          # benchmarks/results/<device>-<date>.json and
                                          # benchmarks/RESULTS.md
    python -m benchmarks --quick          # smoke run (CI): small sizes, few rounds, results
                                          # to a temporary directory; RESULTS.md untouched
    python -m benchmarks --only overhead throughput --out /tmp/bench

Benchmarks (each runs its contenders interleaved in one process after warm-up and
compilation, and reports median, quartiles, min and max; see ``timing.py``):

1. ``overhead``: the library's train step vs a hand-written ``optax.adamw(mask=...)`` step;
2. ``throughput``: images/s vs PyTorch eager and ``torch.compile``;
3. ``bandwidth``: AdamW + masked decay update, bytes/s vs an in-place copy;
4. ``sweep``: ``benchmarks/sweep_vs_sequential.py``'s ``main`` (if present);
5. ``compile``: compile time, recompilations when λ or η change;
6. ``cnn``: where the CNN's time goes on XLA:CPU (pieces, backward passes in ``lax.scan``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import sys
import tempfile
import time
import traceback
from typing import Any

ALL = ("overhead", "throughput", "bandwidth", "sweep", "compile", "cnn")
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Config:
    quick: bool = False
    torch_compile: bool = True

    @property
    def models(self) -> tuple[str, ...]:
        return ("mlp",) if self.quick else ("mlp", "cnn")

    @property
    def batch_size(self) -> int:
        return 32 if self.quick else 128

    @property
    def scan_length(self) -> int:
        return 2 if self.quick else 6

    @property
    def overhead_rounds(self) -> dict[str, int]:
        return {"mlp": 3, "cnn": 2} if self.quick else {"mlp": 40, "cnn": 8}

    @property
    def overhead_number(self) -> dict[str, int]:
        return {"mlp": 2, "cnn": 1} if self.quick else {"mlp": 10, "cnn": 2}

    @property
    def throughput_rounds(self) -> dict[str, int]:
        return {"mlp": 3, "cnn": 2} if self.quick else {"mlp": 15, "cnn": 5}

    @property
    def bandwidth_sizes(self) -> tuple[int, ...]:
        return (1 << 18,) if self.quick else (10_000_000, 100_000_000)

    @property
    def bandwidth_rounds(self) -> int:
        return 3 if self.quick else 10

    def bandwidth_number(self, n: int) -> int:
        return max(1, min(20, 20_000_000 // max(n, 1)))

    @property
    def compile_repeats(self) -> int:
        return 1 if self.quick else 2

    @property
    def cnn_rounds(self) -> int:
        return 2 if self.quick else 10

    @property
    def cnn_number(self) -> int:
        return 1 if self.quick else 3

    @property
    def cnn_scan_length(self) -> int:
        return 2 if self.quick else 4

    @property
    def sweep_argv(self) -> list[str]:
        return ["--quick"] if self.quick else []


def run_sweep(cfg: Config) -> dict[str, Any]:
    path = os.path.join(HERE, "sweep_vs_sequential.py")
    if (
        not os.path.exists(path)
        or importlib.util.find_spec("benchmarks.sweep_vs_sequential") is None
    ):
        return {"status": "not available yet"}
    from benchmarks import sweep_vs_sequential

    if not hasattr(sweep_vs_sequential, "main"):
        return {"status": "not available yet (no main)"}
    argv = cfg.sweep_argv
    result = sweep_vs_sequential.main(argv)
    return {"status": "ok", "argv": argv, "result": result}


def _run_one(name: str, cfg: Config) -> dict[str, Any]:
    if name == "sweep":
        return run_sweep(cfg)
    module = importlib.import_module(f"benchmarks.bench_{name}")
    return module.run(cfg)


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
        help="where to write the table (default: benchmarks/RESULTS.md; --quick: none)",
    )
    p.add_argument(
        "--no-torch-compile", action="store_true", help="skip torch.compile (slow to compile)"
    )
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for PyTorch's OpenMP threads, "
        "set before torch is imported (default PASSIVE: with ACTIVE, PyTorch's spinning threads collapse "
        "when other processes load the cores; '' leaves the environment alone)",
    )
    args = p.parse_args(argv)
    if args.omp_wait_policy and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    cfg = Config(
        quick=args.quick,
        torch_compile=not (args.quick or args.no_torch_compile),
    )

    import jax

    from benchmarks import common, report

    command = "python -m benchmarks" + ("" if not argv else " " + shlex.join(argv))
    env = common.environment()
    print(
        f"wdjax benchmarks ({'quick' if cfg.quick else 'full'}) on {env['device']}, {env['cpu']}, "
        f"{env['cpu_count']} cores, load {env['loadavg_start']}; jax {jax.__version__}",
        flush=True,
    )
    results: dict[str, Any] = {
        "meta": {
            **env,
            "command": command,
            "mode": "quick" if cfg.quick else "full",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        },
        "benchmarks": {},
    }
    t_all = time.perf_counter()
    for name in args.only:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            results["benchmarks"][name] = _run_one(name, cfg)
        except Exception as e:  # record it and go on with the others
            traceback.print_exc()
            results["benchmarks"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        results["benchmarks"][name]["elapsed_s"] = time.perf_counter() - t0
    results["meta"]["elapsed_s"] = time.perf_counter() - t_all
    results["meta"]["loadavg_end"] = common._loadavg()

    out_dir = args.out or (
        tempfile.mkdtemp(prefix="wdjax-bench-") if cfg.quick else os.path.join(HERE, "results")
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(
        out_dir, f"{env['device_slug']}-{env['date']}{'-quick' if cfg.quick else ''}.json"
    )
    with open(path, "w") as f:
        json.dump(jsonable(results), f, indent=1)
    results["meta"]["json_path"] = path
    markdown = args.markdown or (None if cfg.quick else os.path.join(HERE, "RESULTS.md"))
    text = report.render(results)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text)
    print(report.summary(results))
    print(f"results: {path}" + (f"; table: {markdown}" if markdown else ""), flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
