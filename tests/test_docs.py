"""The API reference builds: ``mkdocs build --strict`` fails on a broken reference,
a missing anchor or a page left out of the navigation."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (tmp_path / "api" / "core" / "index.html").read_text()
    assert "wdjax.transforms.decoupled_weight_decay" in html
    assert (tmp_path / "architecture" / "index.html").is_file()
