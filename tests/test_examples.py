"""Smoke test: every script in examples/ runs with --quick and prints a conclusion with numbers."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist"  # beside the checkout

# example -> (extra arguments, regex on the conclusion line, check on its groups)
CASES = {
    "xor_l2": ([], r"max abs difference (\S+)\);", lambda d: float(d) < 1e-5),
    "l1_sparsity": (
        [],
        r"proximal L1 zeroed ([\d.]+)% of kernel weights vs ([\d.]+)% for subgradient",
        lambda prox, sub: float(prox) > float(sub),
    ),
    "penalty_vs_decoupled": (
        [],
        r"the same weights up to float32 rounding \(max \|Δw\| = (\S+),",
        lambda d: float(d) < 1e-5,
    ),
    "regularization_toolbox": (
        [],
        r"whole toolbox reached ([\d.]+)% test accuracy",
        lambda a: 0 < float(a) <= 100,
    ),
    "cnn_weight_decay": (
        ["--data-dir", str(SHARED_MNIST)] if SHARED_MNIST.is_dir() else [],
        r"shrank the kernel norm from ([\d.]+) to ([\d.]+)",
        lambda before, after: float(after) < float(before),
    ),
    "choose_lambda": (
        [],
        r"chose λ=(\S+) \(mean val accuracy ([\d.]+)%",
        lambda lam, acc: float(lam) >= 0,
    ),
    "auto_lambda": (
        [],
        r"tuned λs ended at (\S+), (\S+), (\S+), (\S+) \(horizon 1, 1, inf, inf\); "
        r"the grid chose (\S+)$",
        lambda *lams: all(1e-6 * 0.99 <= float(x) <= 1 for x in lams[:4]) and float(lams[4]) >= 0,
    ),
    "finetune_l2sp": (
        [],
        r"beat decay toward zero in (\d+) of (\d+)",
        lambda wins, total: 0 <= int(wins) <= int(total) > 0,
    ),
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"wdjax_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_smoke_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.filterwarnings("error:.*goes in the next release:DeprecationWarning")  # no 0.1 API
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_quick(name, capsys):
    module = _load(name)
    assert module.__doc__ and "Run:" in module.__doc__ and f"examples/{name}.py" in module.__doc__
    args, pattern, check = CASES[name]
    module.main(["--quick", *args])
    out = capsys.readouterr().out
    conclusions = [line for line in out.splitlines() if line.startswith("Conclusion:")]
    assert conclusions, f"{name} printed no conclusion:\n{out}"
    match = re.search(pattern, conclusions[-1])
    assert match, f"{name}: {pattern!r} not in {conclusions[-1]!r}"
    assert check(*match.groups()), f"{name}: unexpected numbers in {conclusions[-1]!r}"
