"""The documentation's links: every relative link and `#anchor` in the README, docs/ and the
other READMEs leads somewhere, so moving a section cannot leave a link behind (issue 21). And
its one statement of how long a decision takes to reach the edge, the same on every page."""

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


# --------------------------------------------------------------------------- one statement of the delay

DELAY_HEADING = "How long a decision takes to reach the edge"
# Every page that says how long a decision takes to reach the edge says it in these words.
DELAY_PAGES = ("worker/README.md", "docs/design.md", "docs/worker.md")


def words(text: str) -> str:
    """Text as it renders: Markdown's line breaks and a list item's indentation are one space."""
    return " ".join(text.split())


def delay_statement() -> str:
    """The statement, as worker/README.md's section of that name opens with it."""
    text = (ROOT / "worker" / "README.md").read_text()
    statement = re.search(rf"^### {DELAY_HEADING}\n\n(\*\*{DELAY_HEADING}:\*\*.*?)\n\n", text, re.S | re.M)
    assert statement, f"worker/README.md: no section {DELAY_HEADING!r} opening with the statement"
    return words(statement.group(1))


def test_the_delay_to_the_edge_is_stated_once_in_the_same_words_everywhere():
    statement = delay_statement()
    for page in DELAY_PAGES:
        assert statement in words((ROOT / page).read_text()), f"{page}: not the statement of worker/README.md"
    # No other claim of that delay, nor of KV's propagation, anywhere: the statement is the one.
    claim = re.compile(r"reach(?:es)? (?:the edge|that location|an isolate)|propagation|~\s?60 s", re.I)
    for path in pages():
        rest = words(path.read_text()).replace(statement, "").replace(DELAY_HEADING, "")
        rest = rest.replace(slug(DELAY_HEADING), "")
        assert not claim.findall(rest), f"{path.relative_to(ROOT)}: {claim.findall(rest)}"


def test_the_delay_statement_matches_the_schedule_and_the_workers_defaults():
    """Its figures are the CronJob's schedule, wrangler.toml's CACHE_TTL and SCOPES_REFRESH, and
    the Worker's smallest cacheTtl."""
    import tomllib

    import yaml

    statement = delay_statement()
    schedule = yaml.safe_load((ROOT / "k8s" / "base" / "cronjob.yaml").read_text())["spec"]["schedule"]
    assert schedule == "* * * * *" and "every minute by default" in statement
    settings = tomllib.loads((ROOT / "worker" / "wrangler.toml").read_text())["vars"]
    cache_ttl, refresh = int(settings["CACHE_TTL"]), int(settings["SCOPES_REFRESH"])
    (minimum,) = {
        int(m)
        for f in (ROOT / "worker").glob("*.js")
        for m in re.findall(r"const CACHE_TTL = \{[^}]*\bmin: (\d+)", f.read_text())
    }
    assert f"`CACHE_TTL` ({cache_ttl} s by default, at least {minimum})" in statement
    assert f"`SCOPES_REFRESH` ({refresh} s by default)" in statement
    spelled = {2: "two", 3: "three"}
    assert f"about {spelled[(60 + cache_ttl) // 60]} minutes at the defaults" in statement
    assert f"more: about {spelled[(60 + cache_ttl + refresh) // 60]} minutes" in statement
