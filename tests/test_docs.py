"""The documentation's links: every relative link and `#anchor` in the README, docs/ and the
other READMEs leads somewhere, so moving a section cannot leave a link behind (issue 21)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = (
    "README.md",
    "CHANGELOG.md",
    "docs/*.md",
    "worker/README.md",
    "tests/README.md",
    "tests/reference/README.md",
    "bench/README.md",
)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = re.compile(r"[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:


def pages() -> list[Path]:
    found = [path for pattern in PAGES for path in sorted(ROOT.glob(pattern))]
    return [path for path in found if path.is_file()]


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked: only what GitHub
    renders as Markdown holds headings and links."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if marker and (fence is None or marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence)):
            fence = None if fence else marker.group(1)
            lines.append("")
        else:
            lines.append("" if fence else re.sub(r"(`+)(?:(?!\1).)+?\1", lambda m: " " * len(m.group(0)), line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text in lower case, punctuation dropped (letters,
    digits, '-', '_' and spaces kept), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, GitHub's -1, -2... for repeated headings included."""
    seen: dict[str, int] = {}
    raw = path.read_text().splitlines()
    for number, line in enumerate(prose(path.read_text())):
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(raw[number].strip().lstrip("#").strip())
            seen[base] = seen.get(base, -1) + 1
    found = set()
    for base, repeats in seen.items():
        found |= {base, *(f"{base}-{n}" for n in range(1, repeats + 1))}
    return found


def links(path: Path) -> list[str]:
    return [target for line in prose(path.read_text()) for target in LINK.findall(line)]


def broken(path: Path) -> list[str]:
    """The relative links of `path` that lead nowhere: a missing file or folder, or an anchor
    that is no heading of the Markdown file it names."""
    wrong = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        where, _, anchor = target.partition("#")
        destination = (path.parent / where).resolve() if where else path
        if not destination.exists() or ROOT.resolve() not in (destination, *destination.parents):
            wrong.append(f"{target}: no such file in the repository")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            wrong.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT.resolve())}")
    return wrong


def test_slugs_follow_githubs_rules():
    assert slug("The scope table (Range, Country, AS)") == "the-scope-table-range-country-as"
    assert slug("What lands in KV (the Worker's contract)") == "what-lands-in-kv-the-workers-contract"
    assert slug("cacheTtl: un-ban delay against KV reads") == "cachettl-un-ban-delay-against-kv-reads"
    assert slug("The free plan: 100,000 requests a day") == "the-free-plan-100000-requests-a-day"
    assert slug("`STATE_FILE` and [audits](x.md)") == "state_file-and-audits"


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.setattr("tests.test_docs.ROOT", root)
    (tmp_path / "x.md").write_text("# Outside the repository\n")
    (root / "b.md").write_text("# Top\n\n## Part two\n\n## Part two\n")
    page = root / "a.md"
    page.write_text(
        "# A\n[ok](b.md#part-two) [ok](b.md#part-two-1) [ok](#a) [web](https://example.com/x#y)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](c.md) [bad](b.md#part-three) [self](#b) [out](../x.md)\n"
    )
    assert broken(page) == [
        "c.md: no such file in the repository",
        "b.md#part-three: no heading #part-three in b.md",
        "#b: no heading #b in a.md",
        "../x.md: no such file in the repository",
    ]


def test_the_documentation_is_found():
    names = {path.relative_to(ROOT).as_posix() for path in pages()}
    assert {"README.md", "worker/README.md", "tests/README.md", "bench/README.md", "docs/operations.md"} <= names
    assert sum(len(links(path)) for path in pages()) > 50


@pytest.mark.parametrize("page", pages(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    assert broken(page) == []


def test_the_readme_links_every_docs_page():
    linked = {target.split("#")[0] for target in links(ROOT / "README.md")}
    assert {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")} <= linked
