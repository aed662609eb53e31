#!/usr/bin/env python
"""Rewrite the reStructuredText-flavoured docstrings of a package as the Markdown that
mkdocstrings renders. A one-off dev tool: it edits the .py files in place, docstrings only
(the rest of each file is checked to parse to the same AST).

What it converts, in module, class, function and attribute docstrings:

* RST inline literals (double backticks) -> Markdown code (single backticks);
* the roles :func:, :class:, :mod:, :data:, :meth:, :attr:, :obj:, :exc:, :const: (also
  :py:func: etc., the ~a.b.c and "title <target>" forms) -> mkdocstrings cross-references,
  [`x`][full.dotted.path], or [`a.b.c`][] when the text is the path. Short and re-exported
  names (fit, wdjax.rates, wdjax.train.fit from before the lab moved) are resolved with
  griffe to the object's canonical path, and linked only if the docs render that object
  (a "::: module" line in docs/**/*.md); anything else becomes plain code and is listed
  in the report, so the docs build never meets a dangling reference;
* RST simple tables (==== borders, optional header, continuation lines whose first column
  is blank, cells that overrun their column) -> Markdown pipe tables (column-aligned when
  that fits the line length);
* "text::" and an indented literal block -> "text:" and a fenced code block (python when
  the block parses as Python, bash for shell commands, else text); "::" alone on a line
  is dropped, "text ::" loses the colons;
* RST's escaped space (backslash, space, as in a literal followed by "s") is removed.

Indented blocks after a blank line that are not RST literal blocks (Markdown reads them as
code), Markdown pipe tables and fenced blocks are left as they are, so running it twice
changes nothing. A paragraph that conversion pushes past ruff's line length is re-wrapped
(at its own width); a table that cannot fit gets "# noqa: E501" after its docstring.

Usage, from the repository root, with the docs extra installed (it needs griffe), after
every module to be documented has its "::: module" line in docs/api/*.md:

    python docs/scripts/rst_to_md.py --dry-run wdjax   # the report and a diff; writes nothing
    python docs/scripts/rst_to_md.py wdjax             # rewrite in place
    python docs/scripts/rst_to_md.py --check wdjax     # exit 1 if anything is left to convert
    mkdocs build --strict                              # check the result

Exit status: 0 when done (with --check: nothing left to convert), 1 with --check when a
file would change, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import griffe
import yaml

ROLES = ("func", "class", "mod", "data", "meth", "attr", "obj", "exc", "const", "any", "type")
ROLE_RE = re.compile(r":(?:py:)?(?P<role>" + "|".join(ROLES) + r"):`(?P<target>[^`]+)`")
LITERAL_RE = re.compile(r"``(?P<code>[^`]+?)``(?!`)")
INLINE_RE = re.compile(f"{ROLE_RE.pattern}|{LITERAL_RE.pattern}")
BORDER_RE = re.compile(r"^(?P<indent> *)=+(?: +=+)+ *$")
DIRECTIVE_RE = re.compile(r"^::: +(?P<ident>[\w.]+) *$")
SHELL_STARTS = ("$ ", "wdjax ", "python ", "pip ", "mkdocs ", "git ", "cd ", "export ")


# --------------------------------------------------------------------- the index


@dataclass
class Index:
    """The package as mkdocstrings sees it: every object, and which ones the docs render."""

    package: griffe.Module
    objects: dict[str, griffe.Object] = field(default_factory=dict)  # canonical path -> obj
    rendered: set[str] = field(default_factory=set)  # paths that get an anchor in the docs
    rendered_aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical -> paths

    def get(self, path: str) -> griffe.Object | griffe.Alias | None:
        head, _, rest = path.partition(".")
        if head != self.package.name:
            return None
        try:
            return self.package[rest] if rest else self.package
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None


def canonical(obj: griffe.Object | griffe.Alias) -> str | None:
    try:
        return obj.canonical_path if not obj.is_alias else obj.final_target.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def walk(obj: griffe.Object) -> Iterable[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            yield from walk(member)
        elif not member.is_alias:
            yield member


def is_private(name: str) -> bool:
    return name.startswith("_")  # mkdocs.yml: filters: ["!^_"]


def directives(docs: Path) -> list[tuple[str, dict]]:
    """``(identifier, options)`` of every ``::: identifier`` block in the docs."""
    found = []
    for md in sorted(docs.rglob("*.md")):
        lines = md.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = DIRECTIVE_RE.match(line)
            if not m:
                continue
            block = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and not nxt.startswith(" "):
                    break
                block.append(nxt)
            config = yaml.safe_load(textwrap.dedent("\n".join(block))) or {}
            found.append(
                (m["ident"], (config.get("options") or {}) if isinstance(config, dict) else {})
            )
    return found


def rendered_members(obj: griffe.Object, members: object) -> Iterable[griffe.Object | griffe.Alias]:
    """What mkdocstrings-python renders under ``obj`` (our options: filters ``!^_``,
    show_if_no_docstring, no submodules)."""
    if members is False or members == []:
        return
    for name, member in obj.members.items():
        if isinstance(members, list) and name not in members:
            continue
        if not isinstance(members, list) and is_private(name):
            continue
        if member.is_alias:
            if obj.is_module and member.is_imported and not member.is_public:
                continue
            if member.is_module:
                continue
        elif member.is_module:
            continue  # show_submodules: false
        yield member
        if member.is_class and not member.is_alias:
            yield from rendered_members(member, None)


def build_index(package_dir: Path, docs: Path) -> Index:
    package = griffe.load(
        package_dir.name,
        search_paths=[str(package_dir.resolve().parent)],
        docstring_parser=None,
        resolve_aliases=True,
        resolve_external=False,
        try_relative_path=False,  # not ./wdjax when another copy is asked for
    )
    found = Path(
        package.filepath if not isinstance(package.filepath, list) else package.filepath[0]
    )
    if found.resolve().parent != package_dir.resolve():
        sys.exit(f"griffe loaded {package.name} from {found}, not from {package_dir}")
    index = Index(package)
    for obj in walk(package):
        index.objects[obj.path] = obj
    for ident, options in directives(docs):
        root = index.get(ident)
        if root is None:
            print(f"docs: ::: {ident}: not found in {package_dir}", file=sys.stderr)
            continue
        index.rendered.add(ident)
        for member in rendered_members(root, options.get("members")):
            if member.is_alias:
                target = canonical(member)
                if target:
                    index.rendered_aliases.setdefault(target, []).append(member.path)
            else:
                index.rendered.add(member.path)
    return index


# ------------------------------------------------------------- resolving targets


@dataclass
class Scope:
    module: str  # dotted path of the module the docstring is in
    klass: str | None  # dotted path of the enclosing class, if any


@dataclass
class Resolution:
    path: str | None  # the identifier to link to; None: leave as code
    note: str = ""  # why, when it is not the obvious path


def resolve(index: Index, target: str, scope: Scope) -> Resolution:
    name = target.strip().lstrip("~.").removesuffix("()")
    pkg = index.package.name
    candidates = []
    if scope.klass:
        candidates.append(f"{scope.klass}.{name}")
    candidates.append(f"{scope.module}.{name}")
    # inside a package module, a sibling module named like the target's head
    parent_pkg = scope.module.rpartition(".")[0]
    if parent_pkg:
        candidates.append(f"{parent_pkg}.{name}")
    candidates.append(name)
    # 0.1 paths: wdjax.train.fit -> wdjax.lab.train.fit
    head, _, rest = name.partition(".")
    if head == pkg and rest:
        sub = rest.partition(".")[0]
        lab = index.objects.get(f"{pkg}.lab")
        if lab is not None and sub in lab.members and index.get(f"{pkg}.{sub}") is None:
            candidates.append(f"{pkg}.lab.{rest}")
    notes = []
    for cand in candidates:
        obj = index.get(cand)
        if obj is None:
            continue
        path = canonical(obj)
        if path is None:
            notes.append(f"{cand} is an unresolvable alias")
            continue
        if not path.startswith(pkg + ".") and path != pkg:
            return Resolution(None, f"{cand} is {path}, outside {pkg}")
        link = linkable(index, path, scope)
        if link:
            moved = cand == candidates[-1] and cand != name
            note = "moved module" if moved else f"via {cand}" if link != cand else ""
            return Resolution(link, note)
        return Resolution(None, f"{path} is not rendered in the docs")
    # last resort: a unique rendered object with that name (or dotted suffix)
    suffix = name.rpartition(".")[2] if "." in name else name
    matches = sorted(p for p in index.rendered if p.rpartition(".")[2] == suffix)
    if "." in name:
        parts = name.split(".")
        longer = [p for p in matches if p.endswith("." + ".".join(parts[-2:]))]
        matches = longer or matches
    if len(matches) > 1:
        near = [p for p in matches if p.startswith(scope.module.rpartition(".")[0] + ".")]
        matches = near or matches
    if len(matches) == 1:
        return Resolution(matches[0], f"by name: {matches[0]}")
    if matches:
        return Resolution(None, "ambiguous: " + ", ".join(matches))
    return Resolution(None, "; ".join(notes) or "not found")


def linkable(index: Index, path: str, scope: Scope) -> str | None:
    if path in index.rendered:
        return path
    aliases = index.rendered_aliases.get(path, [])
    same = [a for a in aliases if a.startswith(scope.module + ".")]
    return (same or aliases or [None])[0]


# ------------------------------------------------------------------ conversion


@dataclass
class Report:
    links: list[str] = field(default_factory=list)  # resolved, with a note
    unlinked: list[str] = field(default_factory=list)  # left as code
    skipped: list[str] = field(default_factory=list)  # docstrings not converted
    long: list[str] = field(default_factory=list)  # lines over the limit after conversion
    tables: int = 0
    blocks: int = 0


class Converter:
    def __init__(self, index: Index, report: Report) -> None:
        self.index = index
        self.report = report
        self.fit: Fit | None = None

    # inline ---------------------------------------------------------------

    def inline(self, text: str, scope: Scope, where: str) -> str:
        def sub(m: re.Match) -> str:
            if m["code"] is not None:
                return f"`{m['code']}`" if not m["code"].startswith(" ") else m[0]
            return self.role(m["role"], m["target"], scope, where)

        text = INLINE_RE.sub(sub, text)
        # RST's escaped space (``x``\ s): drop it, outside code spans
        parts = re.split(r"(`[^`]*`)", text)
        return "".join(p if i % 2 else p.replace("\\ ", "") for i, p in enumerate(parts))

    def role(self, role: str, target: str, scope: Scope, where: str) -> str:
        title = None
        m = re.match(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", target, re.S)
        if m:
            title, target = m["title"], m["target"]
        target = " ".join(target.split())
        shown = title or (
            target.lstrip("~").rpartition(".")[2] if target.startswith("~") else target
        )
        shown = shown.lstrip(".")
        res = resolve(self.index, target, scope)
        if res.path is None:
            self.report.unlinked.append(f"{where}: :{role}:`{target}` -> `{shown}` ({res.note})")
            return f"`{shown}`"
        if res.note:
            self.report.links.append(f"{where}: :{role}:`{target}` -> {res.path} ({res.note})")
        return f"[`{shown}`][]" if shown == res.path else f"[`{shown}`][{res.path}]"

    # blocks ---------------------------------------------------------------

    def convert(self, doc: str, scope: Scope, where: str, fit: Fit | None = None) -> str:
        """The Markdown version of docstring ``doc`` (its lines as in the source). With
        ``fit``, prose paragraphs that conversion pushed past the line length are
        re-wrapped, and tables are column-aligned when that fits."""
        self.fit = fit
        lines = doc.split("\n")
        rest = [ln for ln in lines[1:] if ln.strip()]
        base = min((indent(ln) for ln in rest), default=fit.column if fit else 0)

        def ind(i: int) -> int:
            return base if i == 0 else indent(lines[i])

        out: list[tuple[str, str]] = []  # (line, kind): kind is prose, table, code or blank
        text: list[str] = []  # pending prose lines, converted together

        def flush() -> None:
            if text:
                converted = self.inline("\n".join(text), scope, where).split("\n")
                out.extend((ln, "prose" if ln.strip() else "blank") for ln in converted)
                text.clear()

        def blank_before() -> None:
            flush()
            if out and out[-1][0].strip():
                out.append(("", "blank"))

        def blank_after(k: int) -> None:
            if k < len(lines) and lines[k].strip():
                out.append(("", "blank"))

        i = 0
        prev_blank = True
        in_list = False
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(("* ", "- ", "+ ")) or re.match(r"^\d+[.)] ", stripped):
                in_list = True
            elif stripped and i > 0 and indent(line) <= base and prev_blank:
                in_list = False
            # already Markdown: a pipe table or a fenced code block, left as it is
            if stripped.startswith("|") or stripped.startswith(("```", "~~~")):
                flush()
                j = i + 1
                if stripped.startswith("|"):
                    while j < len(lines) and lines[j].strip().startswith("|"):
                        j += 1
                    kind = "table"
                else:
                    fence = stripped[:3]
                    while j < len(lines) and not lines[j].strip().startswith(fence):
                        j += 1
                    j = min(j + 1, len(lines))
                    kind = "code"
                out.extend((ln, kind) for ln in lines[i:j])
                i, prev_blank = j, False
                continue
            # an RST simple table
            if BORDER_RE.match(line) and i > 0:
                end = table_end(lines, i)
                if end is not None:
                    blank_before()
                    out.extend((t, "table") for t in self.table(lines[i : end + 1], scope, where))
                    self.report.tables += 1
                    blank_after(end + 1)
                    i, prev_blank = end + 1, False
                    continue
            # a paragraph ending in :: followed by an indented literal block
            if stripped.endswith("::"):
                block = literal_block(lines, i, ind(i))
                if block is not None:
                    start, stop = block
                    lead: str | None = line.rstrip()
                    if stripped == "::":
                        lead = None
                    elif lead.endswith(" ::"):
                        lead = lead[:-3].rstrip()
                    else:
                        lead = lead[:-1]
                    if lead is not None:
                        text.append(lead)
                    blank_before()
                    pad = " " * ind(i)
                    body = textwrap.dedent("\n".join(lines[start:stop])).split("\n")
                    out.append((pad + "```" + language("\n".join(body)), "code"))
                    out.extend(((pad + b) if b.strip() else "", "code") for b in body)
                    out.append((pad + "```", "code"))
                    self.report.blocks += 1
                    blank_after(stop)
                    i, prev_blank = stop, False
                    continue
            # an indented block after a blank line: Markdown code, leave it alone
            if stripped and prev_blank and not in_list and i > 0 and indent(line) >= base + 4:
                flush()
                j = i
                while j < len(lines) and (not lines[j].strip() or indent(lines[j]) >= base + 4):
                    j += 1
                while j > i and not lines[j - 1].strip():
                    j -= 1
                out.extend((ln, "code") for ln in lines[i:j])
                i, prev_blank = j, False
                continue
            text.append(line)
            prev_blank = not stripped
            i += 1
        flush()
        if fit is not None:
            out = self.rewrap(out, base, fit, where)
        return "\n".join(ln for ln, _ in out)

    def rewrap(
        self, out: list[tuple[str, str]], base: int, fit: Fit, where: str
    ) -> list[tuple[str, str]]:
        """Re-wrap each prose paragraph (or list item) that has a line over the limit."""
        result: list[tuple[str, str]] = []
        k = 0
        while k < len(out):
            line, kind = out[k]
            if kind != "prose":
                result.append(out[k])
                k += 1
                continue
            j = k + 1  # an item: prose lines up to a blank, a non-prose line or a new bullet
            while j < len(out) and out[j][1] == "prose" and not BULLET_RE.match(out[j][0]):
                j += 1
            item = [ln for ln, _ in out[k:j]]
            if any(fit.width(ln, k + n, len(out)) > fit.limit for n, ln in enumerate(item)):
                wrapped = wrap_item(item, k, len(out), base, fit)
                if wrapped is None:
                    self.report.long.append(
                        f"{where}: a paragraph cannot be wrapped to {fit.limit}"
                    )
                    wrapped = item
                result.extend((ln, "prose") for ln in wrapped)
            else:
                result.extend((ln, "prose") for ln in item)
            k = j
        return result

    def table(self, lines: list[str], scope: Scope, where: str) -> list[str]:
        border = lines[0]
        pad = " " * indent(border)
        starts = [m.start() for m in re.finditer(r"=+", border)]
        borders = [k for k, ln in enumerate(lines) if BORDER_RE.match(ln)]
        header_end = borders[1] if len(borders) == 3 else None
        rows: list[list[str]] = []
        header: list[list[str]] = []
        for k, ln in enumerate(lines):
            if k in borders or not ln.strip():
                continue
            target = header if header_end is not None and k < header_end else rows
            cells = split_row(ln, starts)
            if target and not cells[0]:  # continuation line: first column blank
                for c, v in enumerate(cells):
                    if v:
                        target[-1][c] = (target[-1][c] + " " + v).strip()
            else:
                target.append(cells)
        head = header[0] if header else [""] * len(starts)
        for extra in header[1:]:
            head = [(a + " " + b).strip() for a, b in zip(head, extra)]
        table = [[escape_pipes(self.inline(c, scope, where)) for c in row] for row in [head, *rows]]
        widths = [max(display_width(row[c]) for row in table) for c in range(len(starts))]

        def fmt(cells: list[str], aligned: bool) -> str:
            if aligned:
                cells = [c + " " * (w - display_width(c)) for c, w in zip(cells, widths)]
            return (pad + "| " + " | ".join(cells) + " |").rstrip()

        def rule(aligned: bool) -> str:
            dashes = ["-" * (w if aligned else 3) for w in widths]
            return pad + (
                "| " + " | ".join(dashes) + " |" if aligned else "|" + "|".join(dashes) + "|"
            )

        aligned = [fmt(table[0], True), rule(True)] + [fmt(r, True) for r in table[1:]]
        if self.fit is None or all(self.fit.width(ln, 1, 0) <= self.fit.limit for ln in aligned):
            return aligned
        return [fmt(table[0], False), rule(False)] + [fmt(r, False) for r in table[1:]]


@dataclass
class Fit:
    """The source lines a docstring's text lands on: the limit (ruff's line-length), the
    column the first line starts at (after the opening quotes), the closing quotes'
    width, and whether a backslash takes two columns (not a raw string)."""

    limit: int
    first: int
    closing: int
    raw: bool
    column: int  # where the string starts: the indentation of a one-line docstring's body

    def width(self, line: str, n: int, total: int) -> int:
        w = display_width(line if self.raw else line.replace("\\", "\\\\"))
        return w + (self.first if n == 0 else 0) + (self.closing if n == total - 1 else 0)


BULLET_RE = re.compile(r"^\s*(?:[*+-]|\d+[.)]) ")
TOKEN_RE = re.compile(r"(?:`[^`]*`|[^\s`]|`)+")
UNSAFE_START = re.compile(r"^(?:[*+-]|\d+[.)]|#+|>|=+|-+|\|)$")  # would start a block


def display_width(text: str) -> int:
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def wrap_item(item: list[str], at: int, total: int, base: int, fit: Fit) -> list[str] | None:
    """Greedy re-wrap of one paragraph or list item (``item`` starts at line ``at`` of a
    docstring of ``total`` lines), keeping its indentation, bullet and hanging indent,
    never breaking inside a code span and never starting a line with a block marker."""
    first = item[0]
    lead = indent(first) if at > 0 else base
    bullet = BULLET_RE.match(first)
    if bullet:
        hang = len(bullet.group())
    elif len(item) > 1:
        hang = indent(item[1])
    else:
        hang = lead
    joined = " ".join(ln.strip() for ln in item)
    if bullet:
        prefix = first[: len(bullet.group())]
        joined = joined[len(bullet.group().strip()) :]
    else:
        prefix = first[: indent(first)]
    words = TOKEN_RE.findall(joined)
    # keep the paragraph's own width (its lines that still fit), up to the limit
    fitting = [fit.width(ln, at + n, -1) for n, ln in enumerate(item)]
    target = max([w for w in fitting if w <= fit.limit] or [fit.limit])
    lines: list[list[str]] = [[]]
    for word in words:
        current = lines[-1]
        n = at + len(lines) - 1
        head = prefix if len(lines) == 1 else " " * hang
        candidate = head + " ".join([*current, word])
        if not current or fit.width(candidate, n, -1) <= target:
            current.append(word)
            continue
        if UNSAFE_START.match(word):  # move the previous word down with it
            if len(current) < 2:
                current.append(word)
                continue
            lines.append([current.pop(), word])
        else:
            lines.append([word])
    text = [(prefix if n == 0 else " " * hang) + " ".join(words_) for n, words_ in enumerate(lines)]
    if (
        at + len(text) == total
        and fit.width(text[-1], at + len(text) - 1, at + len(text)) > fit.limit
    ):
        last = lines[-1]
        if len(last) > 1 and not UNSAFE_START.match(last[-1]):
            text[-1] = (prefix if len(lines) == 1 else " " * hang) + " ".join(last[:-1])
            text.append(" " * hang + last[-1])
    if any(fit.width(t, at + n, -1) > fit.limit for n, t in enumerate(text)):
        return None
    return text


def indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def table_end(lines: list[str], top: int) -> int | None:
    """Index of the bottom border of the simple table whose top border is ``lines[top]``:
    the first later border followed by a blank line or the end (``None``: not a table)."""
    pad = indent(lines[top])
    seen = 0
    for k in range(top + 1, len(lines)):
        ln = lines[k]
        if ln.strip() and indent(ln) < pad:
            return None
        if BORDER_RE.match(ln) and indent(ln) == pad:
            seen += 1
            nxt = lines[k + 1] if k + 1 < len(lines) else ""
            if not nxt.strip() or seen == 2:
                return k
    return None


def split_row(line: str, starts: list[int]) -> list[str]:
    """Cells of a table row: each chunk of text (runs of non-space separated by 2+ spaces,
    not counting spaces inside ````literals````) belongs to the last column starting at or
    before it (one column of slack), so cells may overrun their border."""
    chunks: list[tuple[int, str, int]] = []  # (start, text, end)
    for m in re.finditer(r"(?:``[^`]*``|[^\s`]+|`)+", line):
        if chunks and m.start() - chunks[-1][2] < 2:
            start, text, _ = chunks[-1]
            chunks[-1] = (start, text + line[chunks[-1][2] : m.end()], m.end())
        else:
            chunks.append((m.start(), m.group(), m.end()))
    cells = [""] * len(starts)
    for at, chunk, _ in chunks:
        col = max(c for c, s in enumerate(starts) if s <= at + 1) if at + 1 >= starts[0] else 0
        cells[col] = (cells[col] + " " + chunk).strip()
    return cells


def escape_pipes(cell: str) -> str:
    parts = re.split(r"(`[^`]*`)", cell)
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def literal_block(lines: list[str], i: int, pad: int) -> tuple[int, int] | None:
    """``(start, stop)`` of the indented block after the ``::`` line ``i``, or None."""
    j = i + 1
    while j < len(lines) and not lines[j].strip():
        j += 1
    if j == len(lines) or indent(lines[j]) <= pad:
        return None
    k = j
    while k < len(lines) and (not lines[k].strip() or indent(lines[k]) > pad):
        k += 1
    while not lines[k - 1].strip():
        k -= 1
    return j, k


def language(code: str) -> str:
    try:
        ast.parse(code)
        return "python"
    except SyntaxError:
        pass
    first = code.lstrip().split("\n", 1)[0]
    return "bash" if first.startswith(SHELL_STARTS) else "text"


# --------------------------------------------------------------- the .py files

LITERAL_SOURCE_RE = re.compile(
    r"^(?P<prefix>[rRuU]{0,2})(?P<q>\"\"\"|'''|\"|')(?P<body>.*)(?P=q)$", re.S
)


def encode(value: str, raw: bool, quote: str) -> str | None:
    """The source text of a string literal body with this value (None: can't)."""
    body = value if raw else value.replace("\\", "\\\\")
    if quote in body or body.endswith(quote[0]) or (raw and body.endswith("\\")):
        return None
    return body


def docstring_nodes(tree: ast.Module, module: str) -> Iterable[tuple[ast.Constant, Scope]]:
    """Module, class, function and attribute docstrings, with their scope."""

    def is_str(node: ast.stmt) -> bool:
        return (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        )

    def visit(body: list[ast.stmt], klass: str | None, prefix: str, with_attrs: bool):
        for k, node in enumerate(body):
            if k == 0 and is_str(node):
                yield node.value, Scope(module, klass)
            elif (
                with_attrs
                and k > 0
                and is_str(node)
                and isinstance(body[k - 1], (ast.Assign, ast.AnnAssign))
            ):
                yield node.value, Scope(module, klass)
            if isinstance(node, ast.ClassDef):
                path = f"{prefix}.{node.name}"
                yield from visit(node.body, path, path, True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(node.body, klass, f"{prefix}.{node.name}", False)

    yield from visit(tree.body, None, module, True)


def strip_docstrings(tree: ast.AST) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""
    return ast.dump(tree)


def convert_file(path: Path, module: str, converter: Converter, limit: int) -> tuple[str, str]:
    source = path.read_bytes()
    tree = ast.parse(source)
    offsets = [0]
    for line in source.split(b"\n"):
        offsets.append(offsets[-1] + len(line) + 1)
    edits = []
    for node, scope in docstring_nodes(tree, module):
        a = offsets[node.lineno - 1] + node.col_offset
        b = offsets[node.end_lineno - 1] + node.end_col_offset
        segment = source[a:b].decode("utf-8")
        where = f"{path}:{node.lineno}"
        m = LITERAL_SOURCE_RE.match(segment)
        raw = bool(m) and "r" in m["prefix"].lower()
        if not m or encode(node.value, raw, m["q"]) != m["body"]:
            if INLINE_RE.search(node.value) or "::" in node.value or BORDER_RE.search(node.value):
                converter.report.skipped.append(
                    f"{where}: not a plain string literal; convert by hand"
                )
            continue
        column = len(source[offsets[node.lineno - 1] : a].decode("utf-8"))
        fit = Fit(limit, column + len(m["prefix"]) + len(m["q"]), len(m["q"]), raw, column)
        new = converter.convert(node.value, scope, where, fit)
        if new == node.value:
            continue
        body = encode(new, raw, m["q"])
        if body is None:
            converter.report.skipped.append(f"{where}: the converted text does not fit the quotes")
            continue
        literal = m["prefix"] + m["q"] + body + m["q"]
        lines = new.split("\n")
        over = sum(fit.width(ln, n, len(lines)) > limit for n, ln in enumerate(lines))
        tail = source[b : offsets[node.end_lineno]].decode("utf-8")
        if over and not tail.strip():
            # a table row or code line can't be wrapped; ruff reads a noqa after a
            # multi-line string as covering every line of it
            literal += "  # noqa: E501"
            converter.report.long.append(
                f"{where}: {over} lines over {limit} columns: # noqa: E501 added"
            )
        elif over:
            converter.report.long.append(f"{where}: {over} lines over {limit} columns")
        edits.append((a, b, literal.encode("utf-8")))
    out = source
    for a, b, text in sorted(edits, reverse=True):
        out = out[:a] + text + out[b:]
    old, new = source.decode("utf-8"), out.decode("utf-8")
    if strip_docstrings(ast.parse(old)) != strip_docstrings(ast.parse(new)):
        raise RuntimeError(f"{path}: the rewrite changed more than docstrings")
    return old, new


def ruff_line_length(start: Path) -> int:
    for directory in start.parents:
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file():
            text = pyproject.read_text(encoding="utf-8")
            ruff = re.search(r"^\[tool\.ruff\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
            found = ruff and re.search(r"^line-length\s*=\s*(\d+)", ruff.group(1), re.M)
            return int(found.group(1)) if found else 100
    return 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "package", type=Path, nargs="?", default=Path("wdjax"), help="package directory"
    )
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="the mkdocs docs_dir")
    parser.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file would change")
    parser.add_argument("--quiet", action="store_true", help="no per-reference report")
    parser.add_argument(
        "--line-length", type=int, help="default: [tool.ruff] line-length of pyproject.toml, or 100"
    )
    args = parser.parse_args(argv)
    limit = args.line_length or ruff_line_length(args.package.resolve())
    if not (args.package / "__init__.py").is_file():
        print(f"{args.package} is not a package directory", file=sys.stderr)
        return 2
    if not directives(args.docs):
        print(
            f"no '::: module' lines in {args.docs}/**/*.md: nothing could be linked",
            file=sys.stderr,
        )
        return 2
    report = Report()
    converter = Converter(build_index(args.package, args.docs), report)
    changed = []
    for path in sorted(args.package.rglob("*.py")):
        rel = path.relative_to(args.package.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        old, new = convert_file(path, module, converter, limit)
        if old == new:
            continue
        changed.append(path)
        if args.dry_run:
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True), new.splitlines(True), str(path), str(path)
                )
            )
        elif not args.check:
            path.write_text(new, encoding="utf-8")
    if not args.quiet:
        for title, items in (
            ("resolved indirectly (check these read right)", report.links),
            ("left as code, not linked", report.unlinked),
            ("skipped", report.skipped),
            ("over the line length", report.long),
        ):
            if items:
                print(f"\n{title}:", file=sys.stderr)
                for item in items:
                    print("  " + item, file=sys.stderr)
    verb = "would change" if args.dry_run or args.check else "changed"
    print(
        f"\n{verb} {len(changed)} files; {report.tables} tables, "
        f"{report.blocks} literal blocks; {len(report.unlinked)} references left unlinked, "
        f"{len(report.skipped)} docstrings skipped",
        file=sys.stderr,
    )
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
