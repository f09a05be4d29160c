"""Every relative link and anchor in README.md and docs/ leads somewhere, as GitHub renders them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PAGES = sorted([HERE / "README.md", *(HERE / "docs").rglob("*.md")])
README_MAX_LINES = 300

FENCE = re.compile(r"^(`{3,}|~{3,})")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks: a `# comment` in a shell block is no heading."""
    lines, fence = [], ""
    for line in text.splitlines():
        marker = FENCE.match(line)
        if marker and (not fence or marker.group(1).startswith(fence)):
            fence = "" if fence else marker.group(1)[:3]
        elif not fence:
            lines.append(line)
    return lines


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats -1, -2."""
    seen: dict[str, int] = {}
    for line in _prose(text):
        if heading := HEADING.match(line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(page: Path, text: str) -> list[str]:
    """Each relative link whose file, or whose anchor in that file, does not exist."""
    broken = []
    for line in _prose(text):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto: and the like: not ours to check
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if path and not file.exists():
                broken.append(f"{target}: no such file")
            elif anchor and file.suffix == ".md":
                headings = anchors(file.read_text() if path else text)
                if anchor not in headings:
                    broken.append(f"{target}: no such heading in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(HERE)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page, page.read_text()) == []


def test_the_check_reports_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n## Its part\n")
    page = tmp_path / "page.md"
    text = (
        "# Here\n```sh\n# Not a heading\n```\n"
        "[ok](other.md#its-part) [ok](#here) [ok](https://example.com/x#y) `[code](nowhere.md)`\n"
        "[bad](missing.md) [bad](other.md#nowhere) [bad](#not-a-heading)\n"
    )
    assert broken_links(page, text) == [
        "missing.md: no such file",
        "other.md#nowhere: no such heading in other.md",
        "#not-a-heading: no such heading in page.md",
    ]


def test_anchors_follow_github_rules() -> None:
    text = "# Scaling out: MongoDB, several workers\n## `make test`\n## Logs\n## Logs\n"
    assert anchors(text) == {"scaling-out-mongodb-several-workers", "make-test", "logs", "logs-1"}


TEST_REFERENCE = re.compile(r"(test_\w+\.py)?::(test_\w+)")


def missing_tests(text: str) -> list[str]:
    """Each `test_file.py::test_name` (or `::test_name`, in the file named before it) whose test
    does not exist: a guarantee must name the test that would fail."""
    missing, file = [], ""
    for named_file, test in TEST_REFERENCE.findall(text):
        file = named_file or file
        path = HERE / file
        if not (path.exists() and re.search(rf"^(async )?def {test}\(", path.read_text(), re.M)):
            missing.append(f"{file}::{test}")
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(HERE)))
def test_every_test_a_page_names_exists(page: Path) -> None:
    assert missing_tests(page.read_text()) == []


def test_a_renamed_test_is_reported() -> None:
    text = "`test_docs.py::test_anchors_follow_github_rules`, `::test_gone`, `test_nope.py::test_x`"
    assert missing_tests(text) == ["test_docs.py::test_gone", "test_nope.py::test_x"]


def test_the_readme_reads_in_five_minutes() -> None:
    assert len((HERE / "README.md").read_text().splitlines()) <= README_MAX_LINES
    assert "docs/" in (HERE / "README.md").read_text()
