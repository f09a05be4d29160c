"""ETags and conditional requests: the tags this service issues and what If-Match and
If-None-Match name (RFC 9110, 13.1)."""

from __future__ import annotations

import re
from typing import Literal

from models import Document
from storage import DocumentStore

# The tags this service issues: a version in ASCII digits, no leading zero, at most 18 digits
# (anything else, "01", "²", or 5 000 digits, names no version).
_ISSUED_TAG = re.compile(r'"[1-9][0-9]{0,17}"')


def etag(doc: Document) -> str:
    return f'"{doc.version}"'


def etag_versions(header: str, *, weak: bool) -> list[int | Literal["*"]]:
    """Versions named by an ETag list. If-None-Match compares weakly (W/"3" names version 3);
    If-Match compares strongly, so a weak tag there names nothing (RFC 9110, 13.1)."""
    versions: list[int | Literal["*"]] = []
    for raw in header.split(","):
        tag = raw.strip()
        if tag.startswith("W/"):
            if not weak:
                continue
            tag = tag[2:]
        if tag == "*":
            versions.append("*")
        elif _ISSUED_TAG.fullmatch(tag):
            versions.append(int(tag[1:-1]))
    return versions


def names(header: str, version: int, *, weak: bool) -> bool:
    """Whether an ETag list names `version`, or is `*`."""
    versions = etag_versions(header, weak=weak)
    return "*" in versions or version in versions


async def if_match_version(store: DocumentStore, doc_id: str, lines: list[str]) -> int | None:
    """The version If-Match `lines` demand: None for no header or `*`, -1 (never matches) when it
    names no tag this service issued. A list matches if any tag does (RFC 9110, 13.1.1): of
    several versions, the current one if named, which the write's compare-and-set then holds
    to, so a change in between is still a 412. Several lines form one list."""
    if not lines:
        return None
    versions = etag_versions(", ".join(lines), weak=False)
    if "*" in versions:
        return None
    numbers = {v for v in versions if isinstance(v, int)}
    if len(numbers) > 1:
        current = (await store.get(doc_id)).version
        return current if current in numbers else -1
    return numbers.pop() if numbers else -1


async def write_version(
    store: DocumentStore, doc_id: str, if_match: list[str], if_none_match: list[str]
) -> int | None:
    """The version a write must find (None: any): If-Match's (if_match_version), and
    If-None-Match's, which fails (-1) when it names the current version or is `*` (RFC 9110,
    13.1.2) and else holds the write to the version it was checked against, so that a change
    in between is a 412 too."""
    version = await if_match_version(store, doc_id, if_match)
    if not if_none_match or version == -1:
        return version
    current = (await store.get(doc_id)).version
    if names(", ".join(if_none_match), current, weak=True) or version not in (None, current):
        return -1
    return current
