"""Every Python snippet in the README runs, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.filterwarnings("error:.*goes in the next release:DeprecationWarning")  # no 0.1 API
def test_readme_python_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "regularized 22 of 26 parameters" in out  # the describe() table shown in the README
    assert namespace["train_step"]._cache_size() == 1
