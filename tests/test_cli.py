"""The ``wdjax`` command line: end to end on digits, resume, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wdjax.lab import cli


def _wdjax(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "wdjax.lab.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_train_end_to_end_on_digits(tmp_path):
    out = tmp_path / "run"
    proc = _wdjax("train", "--epochs", "15", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["test"]["accuracy"] >= 0.95
    assert summary["parameters"]["decayed"] < summary["parameters"]["total"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 15 and json.loads(lines[-1])["epoch"] == 15
    assert "test" in proc.stdout and "decayed parameters" in proc.stdout
    # decoupled AdamW: λ is a per-step shrink factor, never reported as a loss penalty
    assert "penalty" not in proc.stdout and "per-step factor c·λ = 1e-07" in proc.stdout
    assert summary["penalties_in_loss"] == {} and summary["decay"]["lr_coupling"] == "lr"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_takes_its_programs_from_the_compile_cache(tmp_path):
    """`--compile-cache DIR`: the first run fills it, the second adds nothing (every
    program a cache hit) and computes the same; `off` writes nothing."""
    cache = tmp_path / "cache"
    argv = ["train", "--epochs", "2", "--widths", "32", "--no-progress"]
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = _wdjax(*argv, "--out", str(out), "--compile-cache", str(cache))
        assert proc.returncode == 0, proc.stderr
        runs.append((sorted(p.name for p in cache.iterdir()), (out / "summary.json").read_text()))
    (first, a), (second, b) = runs
    assert len(first) >= 3 and second == first
    assert json.loads(a)["results"] == json.loads(b)["results"]
    off = tmp_path / "off"
    proc = _wdjax(*argv, "--out", str(tmp_path / "run2"), "--compile-cache", "off")
    assert proc.returncode == 0 and not off.exists()


def test_resume_continues_where_a_run_stopped(tmp_path):
    common = [
        "train",
        "--epochs",
        "4",
        "--checkpoint-every",
        "19",
        "--no-progress",
        "--widths",
        "32",
    ]
    straight = _wdjax(*common, "--out", str(tmp_path / "a"))
    half = _wdjax(*common[:2], "2", *common[3:], "--out", str(tmp_path / "b"))
    resumed = _wdjax(*common, "--out", str(tmp_path / "b"), "--resume")
    assert straight.returncode == half.returncode == resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["results"]
    assert a == b
    again = _wdjax(*common, "--out", str(tmp_path / "b"))
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_bad_input_is_one_line_and_exit_2():
    proc = _wdjax("train", "--model", "resnet")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "wdjax: error: train: argument --model: invalid choice: 'resnet' (choose from 'mlp', 'cnn')"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["train", "--lr", "-1"], "expected a value >= 0.0"),
        (["train", "--weight-decay", "nan"], "expected a value >= 0.0"),
        (["train", "--momentum", "5"], "expected a value >= 0.0 and < 1.0"),
        (["train", "--dropout", "1"], "expected a value >= 0.0 and < 1.0"),
        (["train", "--epochs", "0"], "expected a value >= 1"),
        (["train", "--batch-size", "0"], "expected a value >= 1"),
        (["train", "--checkpoint-every", "0"], "expected a value >= 1"),
        (["train", "--widths", "0"], "expected a value >= 1"),
        (["train", "--widths", "a,b"], "expected a int, got 'a'"),
        (["sweep", "--folds", "1"], "expected a value >= 2"),
        (["sweep", "--weight-decay", "0,-1"], "expected a value >= 0.0"),
        (
            ["train", "--mask", "*/nothing", "--epochs", "1"],
            "mask pattern '*/nothing' matches no parameter",
        ),
        (["train", "--mask", "all", "*/kernel"], "--mask takes one of default, all, none alone"),
        (["train", "--optimizer", "sgd_l2", "--lr-coupling", "schedule"], "does not take"),
        (["train", "--optimizer", "adamw", "--momentum", "0.5"], "adamw does not take --momentum"),
        (["train", "--optimizer-config", "beta=2"], "adamw does not take --beta"),
        (["train", "--model-config", "depth=3"], "unknown config for mlp: ['depth']"),
        (["train", "--model-config", "widths"], "expected key=value"),
        (["train", "--penalty", "l3=1"], "--penalty l3: choose from l2, l1, group_lasso"),
        (["train", "--penalty", "l2=-1"], "--penalty l2: expected a value >= 0.0"),
        (["train", "--resume"], "--resume needs --checkpoint-every"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/wdjax"], "mnist: expected"),
        (["masks", "--model", "mlp", "--mask", "conv*"], "matches no parameter"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("wdjax: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_out_that_is_a_file_fails_before_training(command, capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("")
    assert cli.main([command, "--out", str(target)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_penalties_in_the_loss_and_coupled_decay_are_reported_as_such(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--optimizer", "sgd_l2", "--lr", "0.05", "--penalty", "l1=1e-4", "l2=1e-3"]
    argv += ["--widths", "16", "--epochs", "2", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "penalty in the loss l1:" in printed and "penalty in the loss l2:" in printed
    assert "coupled L2: g ← g + λ·w" in printed and "per-step factor" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["penalties_in_loss"]) == {"l1", "l2"}
    assert summary["config"]["momentum"] is None  # the optimizer's own default (0.9) was used
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["l1"] > 0 and history[-1]["l2"] > 0  # both in the training loss


def test_every_option_has_help_and_no_rst_markup():
    parser = cli.build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            texts.append(sub.format_help())
            for a in sub._actions:
                assert a.help, f"{sub.prog} {a.option_strings} has no help"
    assert not any("``" in t or ":func:" in t for t in texts)


def test_masks_command_prints_the_decay_table(capsys):
    assert cli.main(["masks", "--model", "cnn", "--model-config", "dense=32"]) == 0
    out = capsys.readouterr().out
    assert "conv1/kernel" in out and "(3, 3, 1, 32)" in out and "(256, 32)" in out
    assert "regularized 27,232 of 27,370 parameters" in out  # kernels 288+18432+8192+320


def test_sweep_command_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--widths",
        "16",
        "--weight-decay",
        "0,0.1",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "chosen" in printed and "weight_decay" in printed
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["settings"]) == 2 and len(doc["members"]) == 4  # 2 λ × 2 folds
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
