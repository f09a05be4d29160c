"""The embedded store's in-memory indexes: every document by id, in creation and update order,
and by word, tag and metadata value. A listing walks the smallest of them in the order asked for
and reads a few entries more than it returns; it never scans every document."""

from __future__ import annotations

import bisect
import heapq
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from models import Document, DocumentQuery, document_words

Key = tuple[datetime, str]  # a time, then the id: every order is total
# A walk that is not over the smallest candidate list gives up after this many entries per
# candidate and sorts the candidates instead: never much slower than the better of the two.
WALK_BUDGET_PER_CANDIDATE = 8


class _OverBudget(Exception):
    """A walk read its budget of entries before it found a page."""


def _meta_term(key: str, value: Any) -> tuple[str, bool, Any]:
    # In Python True == 1 == 1.0: the flag keeps booleans apart from numbers, while 12 and 12.0,
    # one JSON number, stay one term.
    return key, isinstance(value, bool), value


def _contains(keys: list[Key], key: Key) -> bool:
    at = bisect.bisect_left(keys, key)
    return at < len(keys) and keys[at] == key


def _discard(keys: list[Key], key: Key) -> None:
    at = bisect.bisect_left(keys, key)
    if at < len(keys) and keys[at] == key:
        del keys[at]


def _span(keys: list[Key], start: datetime | None, end: datetime | None) -> tuple[int, int]:
    """The positions of keys timed in [start, end): "" sorts before every id."""
    lo = 0 if start is None else bisect.bisect_left(keys, (start, ""))
    hi = len(keys) if end is None else bisect.bisect_left(keys, (end, ""))
    return lo, max(lo, hi)


class DocumentIndex:
    """Not thread-safe: the store calls it under its lock. Keys are shared tuples, so each
    posting costs one pointer."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self._words: dict[str, tuple[str, ...]] = {}  # each document's words, to unindex it
        self._created: list[Key] = []
        self._updated: list[Key] = []
        self._by_word: dict[str, list[Key]] = {}
        self._by_tag: dict[str, list[Key]] = {}
        self._by_meta: dict[tuple[str, bool, Any], list[Key]] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, doc_id: str) -> Document | None:
        return self._docs.get(doc_id)

    def oldest_first(self) -> list[Document]:
        return [self._docs[doc_id] for _, doc_id in self._created]

    def put(self, doc: Document, words: Iterable[str] | None = None) -> None:
        """Index `doc`, replacing any version of it; `words` are its words if already known."""
        self.remove(doc.id)
        if words is None:
            words = document_words(doc.title, doc.content)
        # Interned: a word shared by many documents is held once.
        terms = tuple(map(sys.intern, words))
        key = (doc.created_at, doc.id)
        self._docs[doc.id] = doc
        self._words[doc.id] = terms
        bisect.insort(self._created, key)
        bisect.insort(self._updated, (doc.updated_at, doc.id))
        for postings, term in self._terms(doc, terms):
            bisect.insort(postings.setdefault(term, []), key)

    def remove(self, doc_id: str) -> None:
        doc = self._docs.pop(doc_id, None)
        if doc is None:
            return
        key = (doc.created_at, doc_id)
        _discard(self._created, key)
        _discard(self._updated, (doc.updated_at, doc_id))
        for postings, term in self._terms(doc, self._words.pop(doc_id)):
            keys = postings[term]
            _discard(keys, key)
            if not keys:
                del postings[term]

    def _terms(
        self, doc: Document, words: tuple[str, ...]
    ) -> Iterator[tuple[dict[Any, list[Key]], Any]]:
        for word in words:
            yield self._by_word, word
        for tag in doc.tags:
            yield self._by_tag, tag
        for name, value in doc.metadata.items():
            if value is not None:
                yield self._by_meta, _meta_term(name, value)

    # listing

    def page(
        self, query: DocumentQuery, limit: int, after: Key | None
    ) -> tuple[list[Document], Key | None]:
        """Up to `limit` matching documents in the query's order, strictly after `after`, and
        the key to continue from when more match."""
        groups = self._candidates(query)
        if groups is None:
            return [], None
        by_updated = query.sort.endswith("updated_at")
        descending = query.sort.startswith("-")
        sort_key: Callable[[Document], Key] = (
            (lambda d: (d.updated_at, d.id)) if by_updated else (lambda d: (d.created_at, d.id))
        )

        def matches(doc: Document) -> bool:
            key = (doc.created_at, doc.id)
            return (
                (query.created_after is None or doc.created_at >= query.created_after)
                and (query.created_before is None or doc.created_at < query.created_before)
                and (query.updated_after is None or doc.updated_at >= query.updated_after)
                and (query.updated_before is None or doc.updated_at < query.updated_before)
                and all(any(_contains(keys, key) for keys in group) for group in groups)
            )

        # The smallest list of candidates in creation order, within the creation range.
        created = [self._created] + [g[0] if len(g) == 1 else list(heapq.merge(*g)) for g in groups]
        spans = [
            (keys, *_span(keys, query.created_after, query.created_before)) for keys in created
        ]
        by_created = min(spans, key=lambda s: s[2] - s[1])
        by_update = (
            self._updated,
            *_span(self._updated, query.updated_after, query.updated_before),
        )
        ordered, other = (by_update, by_created) if by_updated else (by_created, by_update)
        if other[2] - other[1] < ordered[2] - ordered[1]:
            budget = WALK_BUDGET_PER_CANDIDATE * (other[2] - other[1]) + limit
            try:
                return self._walk(*ordered, descending, after, matches, limit, sort_key, budget)
            except _OverBudget:
                # Too few matches among too many entries: sort the fewer candidates instead.
                keys, lo, hi = other
                resorted = sorted(sort_key(self._docs[doc_id]) for _, doc_id in keys[lo:hi])
                ordered = (resorted, 0, len(resorted))
        return self._walk(*ordered, descending, after, matches, limit, sort_key)

    def _walk(
        self,
        keys: list[Key],
        lo: int,
        hi: int,
        descending: bool,
        after: Key | None,
        matches: Callable[[Document], bool],
        limit: int,
        sort_key: Callable[[Document], Key],
        budget: int | None = None,
    ) -> tuple[list[Document], Key | None]:
        """Walk keys[lo:hi] past `after`; raises _OverBudget after reading `budget` entries."""
        if after is not None:
            if descending:
                hi = max(lo, min(hi, bisect.bisect_left(keys, after, lo, hi)))
            else:
                lo = min(hi, max(lo, bisect.bisect_right(keys, after, lo, hi)))
        found: list[Document] = []
        positions = range(hi - 1, lo - 1, -1) if descending else range(lo, hi)
        for read, at in enumerate(positions):
            if budget is not None and read >= budget:
                raise _OverBudget
            doc = self._docs[keys[at][1]]
            if matches(doc):
                if len(found) == limit:
                    return found, sort_key(found[-1])
                found.append(doc)
        return found, None

    def _candidates(self, query: DocumentQuery) -> list[list[list[Key]]] | None:
        """For each word, tag and metadata filter, the lists a match must be in one of; None
        when a filter matches nothing."""
        groups = [[self._by_word.get(word, [])] for word in query.words]
        groups += [[self._by_tag.get(tag, [])] for tag in dict.fromkeys(query.tag)]
        for name, values in query.metadata_values:
            terms = (self._by_meta.get(_meta_term(name, value), []) for value in values)
            groups.append([keys for keys in terms if keys])
        if not all(any(group) for group in groups):
            return None
        return [[keys for keys in group if keys] for group in groups]
