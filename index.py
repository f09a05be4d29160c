"""The embedded store's in-memory indexes: every document by id, in creation and update order,
and by word, tag and metadata value. A listing walks the smallest of them in the order asked for
(or sorts it, when that is cheaper) and stops one match past the page; a page's work is bounded
whatever the query, so no listing scans every document."""

from __future__ import annotations

import bisect
import functools
import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from models import Document, DocumentQuery, document_words, millis

Key = tuple[int, str]  # a time in milliseconds since the epoch, then the id: every order is total
# What one page may cost, whatever the query: at most this many index entries read and tests
# put to documents (a query of many filters reads fewer entries).
WORK_PER_PAGE = 10_000


def _meta_term(key: str, value: Any) -> tuple[str, bool, Any]:
    # In Python True == 1 == 1.0: the flag keeps booleans apart from numbers, while 12 and 12.0,
    # one JSON number, stay one term.
    return key, isinstance(value, bool), value


# The tests a filter puts to one document.


def _has_word(keys: list[Key], doc: Document) -> bool:
    return _contains(keys, (millis(doc.created_at), doc.id))


def _has_tag(tag: str, doc: Document) -> bool:
    return tag in doc.tags


def _has_value(name: str, terms: set[tuple[str, bool, Any]], doc: Document) -> bool:
    return _meta_term(name, doc.metadata.get(name)) in terms


def _within(name: str, start: datetime | None, end: datetime | None, doc: Document) -> bool:
    at: datetime = getattr(doc, name)
    return (start is None or at >= start) and (end is None or at < end)


def _contains(keys: list[Key], key: Key) -> bool:
    at = bisect.bisect_left(keys, key)
    return at < len(keys) and keys[at] == key


def _discard(keys: list[Key], key: Key) -> None:
    at = bisect.bisect_left(keys, key)
    if at < len(keys) and keys[at] == key:
        del keys[at]


def _span(keys: list[Key], start: datetime | None, end: datetime | None) -> tuple[int, int]:
    """The positions of keys timed in [start, end): "" sorts before every id."""
    lo = 0 if start is None else bisect.bisect_left(keys, (millis(start), ""))
    hi = len(keys) if end is None else bisect.bisect_left(keys, (millis(end), ""))
    return lo, max(lo, hi)


@dataclass(frozen=True, slots=True, eq=False)
class _Filter:
    """One filter of a query: the lists its matches are in (in creation order), and the test
    of one document against it that is cheapest without those lists."""

    lists: list[list[Key]]
    test: Callable[[Document], bool]

    @property
    def size(self) -> int:
        return sum(map(len, self.lists))


@dataclass(frozen=True, slots=True)
class _Checks:
    """What each entry of a walk must pass: the filters and the range its list does not
    already guarantee."""

    tests: list[Callable[[Document], bool]]

    @classmethod
    def of(
        cls,
        filters: list[_Filter],
        created: tuple[datetime | None, datetime | None] = (None, None),
        updated: tuple[datetime | None, datetime | None] = (None, None),
    ) -> _Checks:
        tests = [f.test for f in filters]
        for name, (start, end) in (("created_at", created), ("updated_at", updated)):
            if start is not None or end is not None:
                tests.append(functools.partial(_within, name, start, end))
        return cls(tests)

    def __call__(self, doc: Document) -> bool:
        return all(test(doc) for test in self.tests)

    @property
    def reads(self) -> int:
        """How many entries a page may read: its work shared by the tests of each entry."""
        return WORK_PER_PAGE // (1 + len(self.tests))


# A list of keys in creation or update order, and the span [lo, hi) of it a query may match.
Span = tuple[list[Key], int, int]


def _keys(doc: Document) -> tuple[Key, Key]:
    """Where a document sits in creation and in update order."""
    return (millis(doc.created_at), doc.id), (millis(doc.updated_at), doc.id)


def _size(spans: list[Span]) -> int:
    return sum(hi - lo for _, lo, hi in spans)


class DocumentIndex:
    """Not thread-safe: the store calls it under its lock. Keys are shared tuples, so each
    posting costs one pointer."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self._created: list[Key] = []
        self._updated: list[Key] = []
        # defaultdicts: adding a posting is one lookup (read them with .get, which adds nothing)
        self._by_word: defaultdict[str, list[Key]] = defaultdict(list)
        self._by_tag: defaultdict[str, list[Key]] = defaultdict(list)
        self._by_meta: defaultdict[tuple[str, bool, Any], list[Key]] = defaultdict(list)

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, doc_id: str) -> Document | None:
        return self._docs.get(doc_id)

    def oldest_first(self) -> list[Document]:
        return [self._docs[doc_id] for _, doc_id in self._created]

    def put(self, doc: Document, words: Iterable[str] | None = None) -> None:
        """Index `doc`, replacing any version of it; `words` are its words if already known."""
        self.remove(doc.id)
        key, updated = self._add(doc)
        bisect.insort(self._created, key)
        bisect.insort(self._updated, updated)
        for postings, term in self._terms(doc, words):
            bisect.insort(postings[term], key)

    def extend(self, docs: Iterable[Document]) -> None:
        """Index documents not indexed yet, many at once (at open): append everywhere, then
        sort each list once, which costs little for lists that arrive nearly in order. The
        hottest loop of a start, so written out flat."""
        by_word, by_tag, by_meta = self._by_word, self._by_tag, self._by_meta
        for doc in docs:
            key, updated = self._add(doc)
            self._created.append(key)
            self._updated.append(updated)
            for word in document_words(doc.title, doc.content):
                by_word[word].append(key)
            for tag in doc.tags:
                by_tag[tag].append(key)
            for name, value in doc.metadata.items():
                if value is not None:
                    by_meta[_meta_term(name, value)].append(key)
        for keys in (self._created, self._updated):
            keys.sort()
        for index in (self._by_word, self._by_tag, self._by_meta):
            for keys in index.values():
                keys.sort()

    def _add(self, doc: Document) -> tuple[Key, Key]:
        self._docs[doc.id] = doc
        return _keys(doc)

    def remove(self, doc_id: str) -> None:
        doc = self._docs.pop(doc_id, None)
        if doc is None:
            return
        key, updated = _keys(doc)
        _discard(self._created, key)
        _discard(self._updated, updated)
        # Its words are worked out again rather than kept: memory for every document, against
        # time for the ones that change.
        for postings, term in self._terms(doc, None):
            keys = postings[term]
            _discard(keys, key)
            if not keys:
                del postings[term]

    def _terms(
        self, doc: Document, words: Iterable[str] | None
    ) -> Iterator[tuple[defaultdict[Any, list[Key]], Any]]:
        for word in document_words(doc.title, doc.content) if words is None else words:
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
        the position to continue from while more may match. A page does at most WORK_PER_PAGE
        reads and tests, so one that finds its matches sparse ends early, with fewer documents
        (even none) and the position it reached."""
        filters = self._candidates(query)
        if filters is None:
            return [], None
        by_updated = query.sort_field == "updated_at"
        sort_key = query.position
        # Candidates in creation order: every document, or the smallest filter's documents
        # (two lists when a metadata value is stored both as a number and as text).
        smallest = min(filters, key=lambda f: f.size, default=None)
        created, rest = [self._created], filters
        if smallest is not None and smallest.size < len(self._created):
            created, rest = smallest.lists, [f for f in filters if f is not smallest]
        by_created = [
            (keys, *_span(keys, query.created_after, query.created_before)) for keys in created
        ]
        by_update = [
            (self._updated, *_span(self._updated, query.updated_after, query.updated_before))
        ]
        # Each list's entries are checked against the filters and the range it does not hold.
        created_checks = _Checks.of(rest, updated=(query.updated_after, query.updated_before))
        update_checks = _Checks.of(filters, created=(query.created_after, query.created_before))
        ordered, checks = (by_update, update_checks) if by_updated else (by_created, created_checks)
        other, other_checks = (
            (by_created, created_checks) if by_updated else (by_update, update_checks)
        )
        walk = functools.partial(
            self._walk,
            descending=query.descending,
            after=after,
            limit=limit,
            sort_key=sort_key,
        )
        # Walking the order asked for reads about limit * ordered / fewer entries when the fewer
        # candidates are spread through it; sorting those candidates costs about `fewer`. Sort
        # when that is cheaper and within a page's work.
        fewer = _size(other)
        if fewer * fewer <= limit * _size(ordered) and fewer <= other_checks.reads:
            resorted = sorted(
                sort_key(self._docs[doc_id]) for keys, lo, hi in other for _, doc_id in keys[lo:hi]
            )
            ordered, checks = [(resorted, 0, len(resorted))], other_checks
        return walk(ordered, checks)

    def _walk(
        self,
        spans: list[Span],
        checks: _Checks,
        *,
        descending: bool,
        after: Key | None,
        limit: int,
        sort_key: Callable[[Document], Key],
    ) -> tuple[list[Document], Key | None]:
        """Walk the spans' keys (sort keys), merged in sort order, past `after`; end the page
        after `checks.reads` entries."""
        walks: list[Iterator[Key]] = []
        for keys, lo, hi in spans:
            if after is not None and descending:
                hi = max(lo, min(hi, bisect.bisect_left(keys, after, lo, hi)))
            elif after is not None:
                lo = min(hi, max(lo, bisect.bisect_right(keys, after, lo, hi)))
            walks.append(
                map(keys.__getitem__, range(hi - 1, lo - 1, -1) if descending else range(lo, hi))
            )
        # Two lists are merged as they are read: a page costs what it reads, not their length.
        merged = walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=descending)
        found: list[Document] = []
        last: Key | None = None
        reads = checks.reads
        for read, key in enumerate(merged):
            if read == reads:
                return found, last
            doc = self._docs[key[1]]
            if not checks.tests or checks(doc):
                if len(found) == limit:
                    return found, sort_key(found[-1])
                found.append(doc)
            last = key
        return found, None

    def _candidates(self, query: DocumentQuery) -> list[_Filter] | None:
        """Each word, tag and metadata filter of `query`; None when one matches nothing."""
        filters = []
        for word in query.words:
            keys = self._by_word.get(word, [])
            filters.append(_Filter([keys], functools.partial(_has_word, keys)))
        for tag in query.tag:
            filters.append(_Filter([self._by_tag.get(tag, [])], functools.partial(_has_tag, tag)))
        for name, values in query.metadata_values:
            terms = {_meta_term(name, value) for value in values}
            lists = [self._by_meta[term] for term in terms if term in self._by_meta]
            filters.append(_Filter(lists, functools.partial(_has_value, name, terms)))
        if not all(f.size for f in filters):
            return None
        return filters
