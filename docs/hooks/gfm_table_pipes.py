"""MkDocs hook: GitHub's reading of ``\\|`` inside code spans in table cells.

GitHub needs ``\\|`` for a literal pipe inside a code span in a table cell (the README's
``a·Σ\\|w\\|``) and shows it as ``|``; Python-Markdown keeps the backslash. This drops it,
in table cells only, so README.md reads the same here as on GitHub.
"""

from __future__ import annotations

import re

_CELL = re.compile(r"(<t[dh]>)(.*?)(</t[dh]>)", re.S)
_CODE = re.compile(r"(<code>)(.*?)(</code>)", re.S)


def _unescape_code(match: re.Match[str]) -> str:
    return match[1] + match[2].replace("\\|", "|") + match[3]


def on_page_content(html: str, **kwargs: object) -> str:
    return _CELL.sub(lambda m: m[1] + _CODE.sub(_unescape_code, m[2]) + m[3], html)
