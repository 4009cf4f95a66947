"""The docs the code cites exist: no references to internal notes, every ``docs/<page>.md#<anchor>`` link resolves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SECTION_SIGN = "\u00a7"
SPECS_PATH = "spec" + "s/"
SCANNED = ("zoo", "tests", "benchmarks", "scripts")  # zoo/configs/*.yaml are under zoo/
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg", ".sh", ""}
DOC_LINK = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)(?:#([A-Za-z0-9_-]+))?")
PAGE_LINK = re.compile(r"\]\(([A-Za-z0-9_.-]+\.md)?(?:#([A-Za-z0-9_-]+))?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def scanned_files() -> list[Path]:
    """Text files of the scanned folders, without caches and compiled files."""
    files = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in TEXT_SUFFIXES:
                files.append(path)
    return files


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except hyphens, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (outside code fences), with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result, in_fence = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken(page_name: str, anchor: str | None) -> str | None:
    """Why ``docs/page_name#anchor`` does not resolve, or None when it does."""
    page = DOCS / page_name
    if not page.is_file():
        return f"no file docs/{page_name}"
    if anchor and anchor not in anchors(page):
        return f"no heading #{anchor} in docs/{page_name}"
    return None


def test_github_slug_rules():
    assert github_slug("Where zoo departs from the paper and the released code") == \
        "where-zoo-departs-from-the-paper-and-the-released-code"
    assert github_slug("MAC: memory as context") == "mac-memory-as-context"
    assert github_slug("The `hash_lookup` op (v2)") == "the-hash_lookup-op-v2"


def test_no_reference_to_internal_notes():
    offenders = [f"{path.relative_to(ROOT)}:{number}"
                 for path in scanned_files()
                 for number, line in enumerate(path.read_text(encoding="utf-8", errors="ignore").splitlines(), 1)
                 if SPECS_PATH in line or SECTION_SIGN in line]
    assert not offenders, f"references to the internal notes or a section sign (cite docs/<page>.md#<anchor> or a " \
                          f"paper equation instead): {offenders}"


def test_every_docs_link_in_the_code_resolves():
    links = {(match.group(1), match.group(2), f"{path.relative_to(ROOT)}:{number}")
             for path in scanned_files()
             for number, line in enumerate(path.read_text(encoding="utf-8", errors="ignore").splitlines(), 1)
             for match in DOC_LINK.finditer(line)}
    assert links, "no docs/ links found: the scan is broken"
    problems = [f"{where}: {why}" for page, anchor, where in sorted(links, key=lambda link: link[2])
                if (why := broken(page, anchor))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_between_docs_pages_resolve(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    problems = [why for match in PAGE_LINK.finditer(text)
                if (why := broken(match.group(1) or page, match.group(2)))]
    assert not problems, "\n".join(problems)
