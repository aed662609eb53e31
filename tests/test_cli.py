"""The ``wdjax`` command line: end to end on digits, resume, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wdjax import cli


def _wdjax(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "wdjax.cli", *args],
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
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
        (["train", "--lr", "-1"], "expected a value >= 0"),
        (["train", "--weight-decay", "nan"], "expected a value >= 0"),
        (
            ["train", "--mask", "*/nothing", "--epochs", "1"],
            "mask pattern '*/nothing' matches no parameter",
        ),
        (["train", "--mask", "all", "*/kernel"], "--mask takes one of default, all, none alone"),
        (["train", "--widths", "a,b"], "--widths takes comma-separated integers"),
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
    assert (
        err.startswith("wdjax: error: ") and message in err and len(err.strip().splitlines()) == 1
    )


def test_masks_command_prints_the_decay_table(capsys):
    assert cli.main(["masks", "--model", "cnn", "--dataset", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "conv1/kernel" in out and "(3, 3, 1, 32)" in out
    assert "regularized 220,064 of 220,234 parameters" in out  # kernels: 288+18432+200704+640


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
    assert cli.main(["sweep", "--weight-decay", "0,-1"]) == 2
    assert "expected comma-separated floats" in capsys.readouterr().err
