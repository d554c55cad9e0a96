"""The documentation cannot rot: every ```python block of README.md and docs/*.md (and the READMEs of
csrc/ and benchmarks/) runs, every relative link points at a file (and its #anchor at a heading),
and nothing refers to a path outside the repository.

Blocks run in file order, in one namespace per file, in a temporary working directory, at the tiny
sizes the snippets are written for. A block that cannot run on a CPU-only machine is marked on the
line before its fence with `<!-- snippet: skip (the reason) -->` and is reported as skipped.
Signatures and other non-runnable code use a fence without a language.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted(
    [ROOT / "README.md", ROOT / "csrc" / "README.md", ROOT / "benchmarks" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)
DOC_FILES = [path for path in DOC_FILES if path.is_file()]

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*\((.+)\)\s*-->")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


class Snippet(NamedTuple):
    path: Path
    line: int                # 1-based line of the opening fence
    code: str
    skip_reason: Optional[str]


def _rel(path: Path) -> str:
    """The path from the repository root (the bare name for a file outside it)."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def snippets(path: Path) -> List[Snippet]:
    """The ```python blocks of a markdown file, with the skip reason given on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, language = i, fence.group(2).lower()
        i += 1
        while i < len(lines) and not _FENCE.match(lines[i]):
            i += 1
        if i == len(lines):
            raise AssertionError(f"{_rel(path)}:{start + 1}: code fence is never closed")
        if language in ("python", "py"):
            previous = lines[start - 1] if start > 0 else ""
            skip = _SKIP.search(previous)
            found.append(Snippet(path, start + 1, "\n".join(lines[start + 1:i]) + "\n",
                                 skip.group(1).strip() if skip else None))
        i += 1
    return found


def _markdown_outside_code(path: Path, *, keep_code_spans: bool = False) -> str:
    """The file's text with fenced code blocks blanked, and code spans too unless `keep_code_spans`
    (links inside code are not links; a heading's code span is part of its anchor)."""
    out, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            out.append("")
            continue
        out.append("" if in_code else line if keep_code_spans else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


RUNNABLE = [path for path in DOC_FILES if any(s.skip_reason is None for s in snippets(path))]
SKIPPED = [s for path in DOC_FILES for s in snippets(path) if s.skip_reason is not None]


def run_snippets(path: Path, workdir: Path, monkeypatch) -> None:
    """Run the file's unskipped blocks in order in one namespace; a failure names the block's line."""
    monkeypatch.chdir(workdir)
    namespace = {"__name__": f"docs_snippets_{path.stem}"}
    for snippet in snippets(path):
        if snippet.skip_reason is not None:
            continue
        where = f"{_rel(path)}:{snippet.line}"
        try:
            exec(compile(snippet.code, where, "exec"), namespace)  # noqa: S102 - our own documentation
        except Exception as error:
            raise AssertionError(f"the snippet at {where} failed: {type(error).__name__}: {error}") from error


@pytest.mark.parametrize("path", RUNNABLE, ids=_rel)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    run_snippets(path, tmp_path, monkeypatch)


@pytest.mark.parametrize("snippet", SKIPPED, ids=lambda s: f"{_rel(s.path)}:{s.line}")
def test_skipped_snippets_compile(snippet):
    """A skipped block is still valid Python; the skip (and its reason) shows in the report."""
    compile(snippet.code, f"{_rel(snippet.path)}:{snippet.line}", "exec")
    pytest.skip(f"{_rel(snippet.path)}:{snippet.line}: {snippet.skip_reason}")


def test_a_broken_snippet_fails(tmp_path, monkeypatch):
    """The runner reports a failing block with its file and line, and later blocks see earlier names."""
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```python\nx = 2\n```\n\n<!-- snippet: skip (needs torchrun) -->\n```python\n"
                   "raise SystemExit\n```\n\n```python\nassert x == 3, 'x is not 3'\n```\n", encoding="utf-8")
    found = snippets(doc)
    assert [s.line for s in found] == [3, 8, 12]
    assert [s.skip_reason for s in found] == [None, "needs torchrun", None]
    with pytest.raises(AssertionError, match=r"doc\.md:12 failed: AssertionError: x is not 3"):
        run_snippets(doc, tmp_path, monkeypatch)


def test_every_doc_file_exists():
    names = {_rel(path) for path in DOC_FILES}
    for required in ("README.md", "docs/design.md", "docs/api.md", "docs/losses.md", "docs/training.md",
                     "docs/distributed.md", "benchmarks/README.md", "csrc/README.md"):
        assert required in names, f"{required} is missing"


def heading_anchors(path: Path) -> set:
    """The anchors GitHub gives the file's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated anchor numbered (-1, -2, ...)."""
    anchors, seen = set(), {}
    for line in _markdown_outside_code(path, keep_code_spans=True).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_heading_anchors_follow_github(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# 2. Layout\n## `dk.sequence_logps`: the logits path\n```\n# not a heading\n```\n"
                   "## Layout\n## Layout\n", encoding="utf-8")
    assert heading_anchors(doc) == {"2-layout", "dksequence_logps-the-logits-path", "layout", "layout-1"}


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_relative_links_resolve(path):
    """Every relative link names an existing file, and its #anchor (in a markdown file) a heading there."""
    broken = []
    for target in _LINK.findall(_markdown_outside_code(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL (https:, mailto:)
        file_part, _, anchor = target.partition("#")
        linked = path.parent / file_part if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_rel(path)}: broken links: {broken}"


def _tracked_files() -> List[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist): walk the tree
        skip = {".git", ".venv", "build", "dist", "__pycache__"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_nothing_refers_outside_the_repository():
    """docs/design.md is the design; no file cites a copy outside the repository."""
    outside = ["../" + "shared", "DESIGN" + ".md", "DEVELOPERS" + ".md"]  # split so this file does not match
    offenders = []
    for path in _tracked_files():
        if path == ROOT / "docs" / "design.md" or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images, the compiled extension)
        offenders += [f"{_rel(path)}: {name}" for name in outside if name in text]
    assert not offenders, offenders
