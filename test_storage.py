"""The DocumentStore contract, and what the SQLite store promises about its file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import mongo_store
import sqlite_store
from conftest import fill_millisecond, plain_document
from legacy import LEGACY_FILE, LEGACY_JOURNAL, LEGACY_LOCK
from metrics import MeteredStore, Metrics
from models import (
    INDEXED_WORDS_MAX,
    VERSION_MAX,
    Document,
    DocumentCreate,
    DocumentQuery,
    DocumentUpdate,
    as_stored,
    check_stored,
    document_words,
    millis,
    words,
)
from mongo_store import MongoStore
from sqlite_files import DATABASE_FILE, check_sharers, start_lock
from sqlite_store import SQLiteStore, page_sql
from storage import (
    PAGE_MAX_BYTES,
    DocumentInvalid,
    DocumentNotFound,
    DocumentStore,
    IdempotencyConflict,
    IdempotencyKey,
    IdGenerator,
    Key,
    PreconditionFailed,
    StoreCorrupt,
    StoreUnavailable,
    new_document,
)

pytestmark = pytest.mark.anyio


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "mongodb"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[DocumentStore]:
    """The contract is one suite, run against each backend."""
    opened: DocumentStore
    if request.param == "sqlite":
        opened = SQLiteStore.open(tmp_path, clock=clock)
    else:
        opened = await MongoStore.open(
            request.getfixturevalue("mongo_url"), clock=clock, serving=False
        )
    yield opened
    await opened.close()


def body(title: str = "t", tags: list[str] | None = None, **extra: object) -> DocumentCreate:
    return DocumentCreate.model_validate(
        {"title": title, "content": "c", "tags": tags or [], **extra}
    )


async def test_a_document_at_the_highest_version_is_refused_a_change(
    store: DocumentStore,
) -> None:
    """An import may set the highest version; a change then made one that export wrote and
    import refused: no backup of it could be restored."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    doc = plain_document(IdGenerator()(at), at, version=VERSION_MAX)
    await store.import_documents([doc])
    with pytest.raises(DocumentInvalid, match="at its most") as refused:
        await store.update(doc.id, DocumentUpdate(title="again"))
    assert refused.value.field == "version"
    assert await store.get(doc.id) == doc
    check_stored(doc)  # as export writes it, import takes it


async def test_a_write_the_database_cannot_take_fails_alone(tmp_path: Path) -> None:
    """Writes queued together share a transaction: one whose document the database cannot take
    (a version past 64 bits, which import now refuses before) fails alone, and those beside it
    are committed. It had rolled them all back: 503s for other clients' writes."""
    store = SQLiteStore.open(tmp_path)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    unfit = plain_document(IdGenerator()(at), at, version=2**63)
    # Another process holds the write lock: the writes below queue up and go in one batch.
    holder = sqlite3.connect(tmp_path / DATABASE_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        writes = asyncio.gather(
            store.create(body("a")),
            store.import_documents([unfit]),
            store.create(body("b")),
            store.create(body("c")),
            return_exceptions=True,
        )
        # Each write's first step queues it; the lock goes once all of them have run theirs.
        asyncio.get_running_loop().call_soon(holder.execute, "ROLLBACK")
        outcomes = await writes
        assert isinstance(outcomes[1], OverflowError)
        created = [outcome[0] for outcome in outcomes if isinstance(outcome, tuple)]
        assert [doc.title for doc in created] == ["a", "b", "c"]
        for doc in created:
            assert await store.get(doc.id) == doc
        assert await store.count() == 3
    finally:
        holder.close()
        await store.close()


async def exported(store: DocumentStore) -> list[Document]:
    return [doc async for doc in store.export_documents()]


async def walk(store: DocumentStore, limit: int, **params: object) -> list[str]:
    """Every id a walk of the listing with these query parameters visits, in order."""
    query = DocumentQuery.model_validate(params)
    ids: list[str] = []
    after = None
    while True:
        items, after = await store.page(query, limit=limit, after=after)
        ids.extend(d.id for d in items)
        if after is None:
            return ids


# --- the contract -----------------------------------------------------------------------------


async def test_create_then_get_returns_equal_document(store: DocumentStore) -> None:
    doc, replayed = await store.create(body("hello", ["x"]))
    assert not replayed
    assert (doc.title, doc.tags, doc.version) == ("hello", ["x"], 1)
    assert await store.get(doc.id) == doc
    assert await store.count() == 1


async def test_get_missing_raises_document_not_found(store: DocumentStore) -> None:
    with pytest.raises(DocumentNotFound) as caught:
        await store.get("nope")
    assert caught.value.doc_id == "nope"


@pytest.mark.parametrize("limit", [1, 2, 7, 100])
async def test_pages_walk_newest_first_exactly_once(store: DocumentStore, limit: int) -> None:
    ids = [
        (await store.create(body(f"d{i}", ["even" if i % 2 else "odd"])))[0].id for i in range(9)
    ]
    assert await walk(store, limit) == ids[::-1]
    assert await walk(store, limit, tag=["even"]) == ids[1::2][::-1]
    assert await walk(store, limit, tag=["none"]) == []


async def test_update_merges_and_bumps_version(store: DocumentStore, clock: FakeClock) -> None:
    doc, _ = await store.create(body(tags=["a"], metadata={"k": 1, "j": 2}))
    patch = DocumentUpdate.model_validate({"tags": ["b"], "metadata": {"k": None, "n": "x"}})
    new = await store.update(doc.id, patch, if_version=1)
    assert (new.tags, new.metadata, new.version) == (["b"], {"j": 2, "n": "x"}, 2)
    assert new.updated_at > doc.updated_at
    assert await walk(store, 10, tag=["a"]) == []
    assert await walk(store, 10, tag=["b"]) == [doc.id]


async def test_a_patch_to_a_value_python_finds_equal_but_json_does_not_is_a_change(
    store: DocumentStore,
) -> None:
    """1 == True == 1.0 in Python; in the document they are three different values, and a
    filter tells them apart."""
    doc, _ = await store.create(body(metadata={"pages": 1, "flag": 0, "ratio": 2}))
    patch = DocumentUpdate.model_validate({"metadata": {"pages": True, "flag": False}})
    new = await store.update(doc.id, patch)
    assert (new.metadata, new.version) == ({"pages": True, "flag": False, "ratio": 2}, 2)
    assert await store.get(doc.id) == new
    assert await walk(store, 10, **{"metadata.pages": "true"}) == [doc.id]
    floated = await store.update(doc.id, DocumentUpdate(metadata={"ratio": 2.0}))
    assert (type(floated.metadata["ratio"]), floated.version) == (float, 3)
    same = await store.update(doc.id, DocumentUpdate(metadata={"pages": True}))
    assert same.version == 3


async def test_stale_version_raises_precondition_failed_and_changes_nothing(
    store: DocumentStore,
) -> None:
    doc, _ = await store.create(body())
    with pytest.raises(PreconditionFailed) as caught:
        await store.update(doc.id, DocumentUpdate(title="x"), if_version=2)
    assert caught.value.current_version == 1
    with pytest.raises(PreconditionFailed):
        await store.delete(doc.id, if_version=3)
    assert await store.get(doc.id) == doc


async def test_metadata_limit_applies_after_merge(store: DocumentStore) -> None:
    doc, _ = await store.create(body(metadata={f"a{i}": i for i in range(40)}))
    with pytest.raises(DocumentInvalid):
        await store.update(doc.id, DocumentUpdate(metadata={f"b{i}": i for i in range(11)}))
    assert await store.get(doc.id) == doc


async def test_delete_removes_from_reads_and_pages(store: DocumentStore) -> None:
    doc, _ = await store.create(body(tags=["x"]))
    await store.delete(doc.id)
    with pytest.raises(DocumentNotFound):
        await store.get(doc.id)
    assert await walk(store, 5) == []
    assert await walk(store, 5, tag=["x"]) == []
    with pytest.raises(DocumentNotFound):
        await store.delete(doc.id)


async def test_idempotency_replays_conflicts_and_expires_after_24h(
    store: DocumentStore, clock: FakeClock
) -> None:
    key = IdempotencyKey("alice", "k1")
    first, _ = await store.create(body("a"), idempotency=key)
    again, replayed = await store.create(body("a"), idempotency=key)
    assert (again, replayed) == (first, True)
    with pytest.raises(IdempotencyConflict):
        await store.create(body("b"), idempotency=key)
    other_scope, replayed = await store.create(body("a"), idempotency=IdempotencyKey("bob", "k1"))
    assert other_scope.id != first.id
    assert not replayed
    clock.now += timedelta(hours=24)
    fresh, replayed = await store.create(body("b"), idempotency=key)
    assert fresh.id != first.id
    assert not replayed


async def test_expired_idempotency_records_go_while_the_store_runs(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Keys are remembered for 24 hours, not until the next start: keyed creates take the
    expired records out, so the table holds the keys of the last day, documents deleted or not."""
    store = SQLiteStore.open(tmp_path, clock=clock)
    try:
        for n in range(3):
            doc, _ = await store.create(body(), idempotency=IdempotencyKey("alice", f"old{n}"))
            await store.delete(doc.id)
        clock.now += timedelta(hours=25)
        live = IdempotencyKey("alice", "new0")
        first, _ = await store.create(body(), idempotency=live)
        await store.create(body(), idempotency=IdempotencyKey("alice", "new1"))
        assert await store.create(body(), idempotency=live) == (first, True)
        with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
            keys = sorted(row[0] for row in conn.execute("SELECT key FROM idempotency"))
        conn.close()
        assert keys == ["new0", "new1"]
    finally:
        await store.close()


async def test_a_database_of_the_first_schema_is_migrated_at_start(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Its documents, keys, tags and metadata stay; expired keys are then found by their age's
    index, not by a scan of the table in the writer."""
    store = SQLiteStore.open(tmp_path, clock=clock)
    made = body(tags=["x"], metadata={"n": 1})
    first, _ = await store.create(made, idempotency=IdempotencyKey("alice", "k"))
    await store.close()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:  # as the first release left it
        conn.execute("DROP INDEX idempotency_created")
        for table, columns, typed in (
            ("tags", "tag", "tag TEXT NOT NULL"),
            ("metadata", "key, value", "key TEXT NOT NULL, value NOT NULL"),
        ):
            old = (
                f"{typed}, created INTEGER NOT NULL, id TEXT NOT NULL, n INTEGER NOT NULL,"
                f" PRIMARY KEY ({columns}, created, id)"
            )
            copy = f"SELECT {columns}, created, id, n FROM {table} JOIN documents USING (n)"  # noqa: S608
            conn.execute(f"CREATE TABLE old ({old}) WITHOUT ROWID")
            conn.execute(f"INSERT INTO old {copy}")
            conn.execute(f"DROP TABLE {table}")
            conn.execute(f"ALTER TABLE old RENAME TO {table}")
        conn.executescript(CONTENTLESS_WORDS)
        conn.execute("INSERT INTO words (rowid, terms) SELECT n, 'x' FROM documents")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = SQLiteStore.open(tmp_path, clock=clock)
    try:
        assert await store.create(made, idempotency=IdempotencyKey("alice", "k")) == (first, True)
        assert await walk(store, 5, tag=["x"], **{"metadata.n": "1"}) == [first.id]
        assert await walk(store, 5, **{"metadata.n": "1"}) == [first.id]
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(sqlite_store.MIGRATIONS),)
        sql = "EXPLAIN QUERY PLAN SELECT scope, key FROM idempotency WHERE created <= 0"
        assert "INDEX idempotency_created" in conn.execute(sql).fetchone()[3]
    conn.close()


# The words' index of schemas 1-3: it kept no copy of the words it was given.
CONTENTLESS_WORDS = """
    DROP TABLE words;
    CREATE VIRTUAL TABLE words USING fts5 (terms, content='', tokenize='ascii', detail='none');
    DELETE FROM meta WHERE name = 'words';
"""


async def test_words_another_version_found_are_found_again_at_start(tmp_path: Path) -> None:
    """Words an earlier version or another Python found (its rules, its Unicode) are found again
    by this one's at start: `q` finds what the text says, and an edit or a delete of such a
    document leaves the index whole (one had found it damaged, and every process unready)."""
    store = SQLiteStore.open(tmp_path)
    doc, _ = await store.create(body("A", content="alpha"))
    other, _ = await store.create(body("B", content="gamma"))
    await store.close()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:  # as schema 3 left it, other rules
        conn.executescript(CONTENTLESS_WORDS + "PRAGMA user_version = 3;")
        sql = "INSERT INTO words (rowid, terms) SELECT n, ? FROM documents WHERE id = ?"
        conn.executemany(sql, [("a al pha", doc.id), ("gam ma", other.id)])
    conn.close()
    store = SQLiteStore.open(tmp_path)
    try:
        assert await walk(store, 5, q="pha") == []
        assert await walk(store, 5, q="alpha") == [doc.id]
        await store.update(doc.id, DocumentUpdate(content="delta"))
        await store.delete(other.id)
        assert await walk(store, 5, q="alpha") + await walk(store, 5, q="gamma") == []
        assert await walk(store, 5, q="delta") == [doc.id]
        await store.check()
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        sql = "INSERT INTO words (words, rank) VALUES ('integrity-check', 1)"
        conn.execute(sql)  # FTS5's own check of its index against the words it keeps
    conn.close()


async def test_a_process_writes_nothing_once_another_indexed_words_by_other_rules(
    tmp_path: Path,
) -> None:
    """A process started since by other rules (another version or Python) found every document's
    words again by them. Words found by this one's would mix two rules in the index: its writes
    fail, a task's (import) as a service's, until it is started again and finds them by its own."""
    store = SQLiteStore.open(tmp_path)
    task = SQLiteStore.open(tmp_path, migrate=False)
    doc, _ = await store.create(body("A", content="alpha"))
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        conn.execute("UPDATE meta SET value = 'other rules' WHERE name = 'words'")
    conn.close()
    try:
        with pytest.raises(StoreUnavailable, match=r"indexed by other rules \(other rules;"):
            await store.create(body("B"))
        with pytest.raises(StoreUnavailable, match="indexed by other rules"):
            await task.import_documents([doc.model_copy(update={"id": "0" * 26})])
        assert await store.get(doc.id) == doc  # reads go on
    finally:
        await store.close()
        await task.close()
    store = SQLiteStore.open(tmp_path)
    try:
        await store.create(body("B", content="beta"))
        assert await walk(store, 5, q="alpha") == [doc.id]
    finally:
        await store.close()


async def test_import_keeps_ids_and_timestamps_and_skips_existing(store: DocumentStore) -> None:
    doc = Document(
        id="01JDQ7Z8X4M2N6P9R3T5V7W9YB",
        title="imported",
        content="c",
        tags=["t"],
        metadata={},
        created_at=datetime(2025, 5, 1, tzinfo=UTC),
        updated_at=datetime(2025, 6, 1, tzinfo=UTC),
        version=4,
    )
    assert await store.import_documents([doc])
    assert not await store.import_documents([doc.model_copy(update={"title": "other"})])
    assert await store.get(doc.id) == doc
    assert await exported(store) == [doc]
    # An id twice in one call is its first document (on MongoDB, either could be kept).
    twice = [imported(1, title=title) for title in ("one", "two")]
    assert await store.import_documents(twice) == 1
    assert await exported(store) == [twice[0], doc]


async def test_export_is_oldest_first_whatever_the_ids(store: DocumentStore) -> None:
    """On MongoDB it went by id, which follows creation only among the ids made here."""
    older = imported(1).model_copy(update={"id": "01J" + "Z" * 23})
    newer = imported(2).model_copy(update={"id": "01J" + "0" * 23})
    for doc in (newer, older):
        assert await store.import_documents([doc])
    assert await exported(store) == [older, newer]


ONE_MILLISECOND: list[tuple[dict[str, Any], int, tuple[int, ...]]] = [
    # (listing, documents of the millisecond, four-byte characters of their contents in turn)
    ({}, 150, (1,)),
    ({"sort": "created_at"}, 150, (1,)),
    ({"q": "word"}, 150, (1,)),
    ({"q": "word", "sort": "created_at"}, 150, (1,)),
    ({"tag": ["t"]}, 150, (1,)),
    ({"metadata.k": "1", "sort": "created_at"}, 150, (1,)),
    ({"sort": "-updated_at"}, 150, (1,)),
    # Pages end at 1 MiB inside the millisecond, before small documents that would still fit.
    ({}, 30, (25_000,)),
    ({}, 25, (100_000, 1, 100_000, 10, 50_000)),
    ({"sort": "created_at"}, 25, (100_000, 1, 100_000, 10, 50_000)),
]


@pytest.mark.parametrize(("params", "count", "sizes"), ONE_MILLISECOND)
async def test_documents_of_one_millisecond_are_taken_in_any_order_and_paged_by_id(
    store: DocumentStore, params: dict[str, Any], count: int, sizes: tuple[int, ...]
) -> None:
    """The embedded store had kept the documents of one millisecond in id order by the room
    left between their keys: about 250 fitted when they came in id order, a dozen in another,
    and the next was refused (an import of data whose times are whole seconds stopped there).
    Up to 16 384 now fit in any order, and every listing pages them by (time, id), documents
    of every size among them: none passed over for a page's size is skipped."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    fields: dict[str, Any] = {"tags": ["t"], "metadata": {"k": 1}}
    docs = [
        imported(n, content="word " + "\U0001f600" * sizes[n % len(sizes)], **fields)
        for n in range(count)
    ]
    docs = [doc.model_copy(update={"created_at": at, "updated_at": at}) for doc in docs] + [
        imported(count + n, content="word", created_at=moment, updated_at=moment, **fields)
        for n, moment in enumerate([at - timedelta(milliseconds=1), at + timedelta(milliseconds=1)])
    ]
    random.Random(5).shuffle(docs)
    for doc in docs:
        assert await store.import_documents([doc])
    in_order = [doc.id for doc in sorted(docs, key=lambda doc: (doc.created_at, doc.id))]
    newest_first = params.get("sort") != "created_at"
    assert await walk(store, 7 if max(sizes) == 1 else 100, **params) == (
        in_order[::-1] if newest_first else in_order
    )


@pytest.mark.parametrize("sort", ["created_at", "-created_at"])
async def test_a_page_ends_where_the_next_document_in_id_order_does_not_fit(
    store: DocumentStore, sort: str
) -> None:
    """Two documents of 400 KB, then in the next millisecond a small one and one of 400 KB that
    was written first: the small one still fits in the first page's 1 MiB. The embedded store
    had ended the page at the large one, the first of its millisecond in the order written."""
    large = "\U0001f600" * 100_000
    at = datetime(2025, 1, 1, tzinfo=UTC)
    first, second = (
        [imported(n, content=content, created_at=moment, updated_at=moment) for n, content in pair]
        for moment, pair in (
            (at, [(1, large), (2, large)]),
            (at + timedelta(milliseconds=1), [(3, "small"), (4, large)]),
        )
    )
    for doc in [*first, second[1], second[0]]:
        assert await store.import_documents([doc])
    pages = []
    after = None
    while True:
        items, after = await store.page(
            DocumentQuery.model_validate({"sort": sort}), limit=20, after=after
        )
        pages.append([doc.id for doc in items])
        if after is None:
            break
    ids = [imported(n).id for n in (1, 2, 3, 4)]
    assert pages == ([ids[:3], ids[3:]] if sort == "created_at" else [ids[:0:-1], ids[:1]])


async def test_keys_of_a_full_millisecond_freed_by_deletes_are_taken_again(
    tmp_path: Path,
) -> None:
    """A millisecond holds 16 384 documents at once: its keys had been handed out in turn, so
    a document deleted below the last taken left a key no document would get again."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    store = SQLiteStore.open(tmp_path)
    try:
        docs = await fill_millisecond(store, at)
        for doc in docs[:2] + docs[7_000:7_002]:
            await store.delete(doc.id)
        late = [plain_document(IdGenerator()(at), at) for _ in range(5)]
        for doc in late[:4]:
            assert await store.import_documents([doc])
        with pytest.raises(DocumentInvalid, match="one millisecond"):
            await store.import_documents([late[4]])
        assert await store.count() == sqlite_store.SLOTS
    finally:
        await store.close()


# --- finding documents ------------------------------------------------------------------------


def imported(n: int, title: str = "t", content: str = "c", **fields: Any) -> Document:
    """Document n, created n milliseconds into 2025 unless `fields` say otherwise."""
    at = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(milliseconds=n)
    values: dict[str, Any] = {
        "tags": [],
        "metadata": {},
        "created_at": at,
        "updated_at": at,
        "version": 1,
        **fields,
    }
    return Document(id=f"01J{n:023d}", title=title, content=content, **values)


async def test_q_finds_whole_words_of_title_or_content_ignoring_case_and_accents(
    store: DocumentStore,
) -> None:
    docs = [
        imported(1, "Crème brûlée", "a recipe"),
        imported(2, "Report", "REVENUE grew; costs fell"),
        imported(3, "Revenues", "plural, and crème_brûlée is two words"),
        imported(4, "Straße 12", "Ünïcödé"),
        imported(
            5,
            "\U0001d407\U0001d41e\U0001d425\U0001d425\U0001d428 \uff37\uff2f\uff32\uff2c\uff24",
            "हिन्दी",
        ),
    ]
    for doc in docs:
        await store.import_documents([doc])
    ids = [doc.id for doc in docs]
    for q, found in [
        ("creme", [ids[2], ids[0]]),
        ("CRÈME Brulee", [ids[2], ids[0]]),
        ("revenue", [ids[1]]),
        ("reven", []),
        ("revenue grew", [ids[1]]),
        ("revenue recipe", []),  # every word must be in the document
        ("report costs", [ids[1]]),  # one word in the title, one in the content
        ("strasse", [ids[3]]),
        ("12 unicode", [ids[3]]),
        ("hello world", [ids[4]]),  # mathematical bold and fullwidth letters
        ("हिन्दी", [ids[4]]),  # vowel signs stay inside their word...
        ("ह", []),  # ...so its first letter is not a word of its own
    ]:
        assert await walk(store, 2, q=q) == found, q


async def test_tags_must_all_match(store: DocumentStore) -> None:
    a, _ = await store.create(body("a", ["x", "y"]))
    b, _ = await store.create(body("b", ["x"]))
    assert await walk(store, 5, tag=["x"]) == [b.id, a.id]
    assert await walk(store, 5, tag=["X ", "y"]) == [a.id]
    assert await walk(store, 5, tag=["x", "z"]) == []


async def test_metadata_value_matches_as_string_or_as_the_number_or_boolean_it_spells(
    store: DocumentStore,
) -> None:
    values: list[Any] = [12, "12", 12.0, 12.5, True, "true", 1, None, "TRUE", 2**63 - 1, 9e18]
    values.append(-(2.0**63))
    docs = [imported(n, metadata={"v": value}) for n, value in enumerate(values)]
    for doc in docs:
        await store.import_documents([doc])
    await store.import_documents([imported(99, metadata={"other": 12})])

    def having(*wanted: int) -> list[str]:
        return [docs[n].id for n in sorted(wanted, reverse=True)]

    for value, found in [
        ("12", having(0, 1, 2)),
        ("12.0", having(0, 2)),
        ("1.2e1", having(0, 2)),
        ("12.5", having(3)),
        ("true", having(4, 5)),
        ("1", having(6)),  # a number is never a boolean
        ("null", []),  # null spells neither a number nor a boolean
        ("TRUE", having(8)),
        ("9223372036854775807", having(9)),
        ("9000000000000000000", having(10)),  # the integer is the float
        ("9e18", having(10)),
        ("-9223372036854775808", having(11)),
        ("9223372036854775808", []),  # past 64 bits: no stored number, and not 2**63 - 1
        ("9.223372036854776e18", []),
        ("012", []),  # not JSON's spelling of a number
    ]:
        assert await walk(store, 3, **{"metadata.v": value}) == found, value
    both = {"metadata.v": "12", "metadata.other": "12"}
    assert await walk(store, 3, **both) == []


async def test_time_ranges_are_half_open(store: DocumentStore, clock: FakeClock) -> None:
    docs = [imported(n) for n in range(5)]
    for doc in docs:
        await store.import_documents([doc])
    touched = await store.update(docs[1].id, DocumentUpdate(title="touched"))
    ids = [doc.id for doc in docs]
    created = [doc.created_at.isoformat() for doc in docs]
    assert await walk(store, 2, created_after=created[1], created_before=created[3]) == [
        ids[2],
        ids[1],
    ]
    assert await walk(store, 2, created_before=created[0]) == []
    since = touched.updated_at.isoformat()
    assert await walk(store, 2, updated_after=since) == [ids[1]]
    assert await walk(store, 2, updated_before=since) == [ids[4], ids[3], ids[2], ids[0]]


@pytest.mark.parametrize("limit", [1, 2, 100])
async def test_every_sort_is_total_with_ties_broken_by_id(store: DocumentStore, limit: int) -> None:
    # Three documents created in one millisecond, two updated in another.
    docs = [imported(n % 2, updated_at=imported(10 + n % 3).created_at) for n in range(6)]
    docs = [doc.model_copy(update={"id": f"01J{n:023d}"}) for n, doc in enumerate(docs)]
    for doc in docs:
        await store.import_documents([doc])
    for sort, field in [
        ("-created_at", "created_at"),
        ("created_at", "created_at"),
        ("-updated_at", "updated_at"),
        ("updated_at", "updated_at"),
    ]:
        ordered = sorted(docs, key=lambda d: (getattr(d, field), d.id))
        expected = [d.id for d in (ordered[::-1] if sort.startswith("-") else ordered)]
        assert await walk(store, limit, sort=sort) == expected, sort


@pytest.mark.parametrize("sort", ["-created_at", "created_at"])
async def test_a_walk_visits_every_match_once_while_documents_are_created(
    store: DocumentStore, sort: str
) -> None:
    first = [(await store.create(body(f"d{i}", ["t"])))[0].id for i in range(5)]
    query = DocumentQuery(tag=["t"], sort=sort)  # type: ignore[arg-type]
    seen: list[str] = []
    added: list[str] = []
    items, after = await store.page(query, limit=2)
    while True:
        seen += [doc.id for doc in items]
        added.append((await store.create(body("new", ["t"])))[0].id)
        if after is None:
            break
        items, after = await store.page(query, limit=2, after=after)
    if sort == "-created_at":
        assert seen == first[::-1]
    else:  # documents created during the walk come after every older one
        assert seen[:5] == first
        assert seen[5:] == added[: len(seen) - 5]
    assert len(set(seen)) == len(seen)


async def test_a_document_is_timed_once_its_words_are_found(
    store: DocumentStore, clock: FakeClock
) -> None:
    """Finding a large text's words takes tens of ms. On MongoDB a create was timed before it,
    so a document created meanwhile came first, and a walk in creation order that had passed
    that one never saw the slow one."""
    slow = asyncio.create_task(store.create(body("slow", content="\u01c4 " * 50_000)))
    await asyncio.sleep(0)  # the slow create runs until it waits for its words
    quick, _ = await store.create(body("quick"))
    late, _ = await slow
    assert late.created_at > quick.created_at


def reference(docs: list[Document], params: dict[str, Any]) -> list[str]:
    """The listing the contract describes, computed by brute force over every document."""
    query = DocumentQuery.model_validate(params)

    def spelled(value: Any, text: str) -> bool:
        if isinstance(value, str):
            return value == text
        if isinstance(value, bool):
            return text == str(value).lower()
        try:
            number = json.loads(text)
        except ValueError:
            return False
        return type(number) in (int, float) and number == value

    def matches(doc: Document) -> bool:
        text = set(words(doc.title)) | set(words(doc.content))
        return (
            set(query.words) <= text
            and set(query.tag) <= set(doc.tags)
            and all(spelled(doc.metadata.get(k), v) for k, v in query.metadata.items())
            and (query.created_after or doc.created_at) <= doc.created_at
            and doc.created_at < (query.created_before or datetime.max.replace(tzinfo=UTC))
            and (query.updated_after or doc.updated_at) <= doc.updated_at
            and doc.updated_at < (query.updated_before or datetime.max.replace(tzinfo=UTC))
        )

    field = query.sort.lstrip("-")
    found = sorted(filter(matches, docs), key=lambda d: (getattr(d, field), d.id))
    return [d.id for d in (found[::-1] if query.sort.startswith("-") else found)]


async def test_every_combination_of_filters_and_sorts_agrees_with_brute_force(
    store: DocumentStore,
) -> None:
    rng = random.Random(7)
    vocabulary = ["alpha", "Beta", "gamma", "délta", "12", "omega"]
    values: list[Any] = [12, "12", 12.0, True, "true", 1, "x", None]
    for n in range(60):
        created = rng.randrange(20)
        doc = imported(
            n,
            title=rng.choice(vocabulary),
            content=" ".join(rng.sample(vocabulary, 3)),
            tags=rng.sample(["a", "b", "c"], rng.randrange(3)),
            metadata={"k": rng.choice(values), "j": rng.choice(values)},
            created_at=imported(created).created_at,
            updated_at=imported(created + rng.randrange(10)).created_at,
        )
        await store.import_documents([doc.model_copy(update={"id": f"01J{n:023d}"})])
    for doc in rng.sample(await exported(store), 10):
        await store.update(doc.id, DocumentUpdate(title=rng.choice(vocabulary), tags=["a"]))
    for doc in rng.sample(await exported(store), 5):
        await store.delete(doc.id)
    docs = await exported(store)
    times = [imported(n).created_at.isoformat() for n in range(0, 30, 3)]
    for _ in range(40):
        sort = rng.choice(["-created_at", "created_at", "-updated_at", "updated_at"])
        params: dict[str, Any] = {"sort": sort}
        if rng.random() < 0.5:
            params["q"] = " ".join(rng.sample(vocabulary, rng.randrange(1, 3))).upper()
        if rng.random() < 0.4:
            params["tag"] = rng.sample(["a", "b", "c"], rng.randrange(1, 3))
        if rng.random() < 0.4:
            params["metadata." + rng.choice("kj")] = rng.choice(["12", "12.0", "true", "1", "x"])
        for bound in ("created_after", "created_before", "updated_after", "updated_before"):
            if rng.random() < 0.2:
                params[bound] = rng.choice(times)
        limit = rng.choice([1, 3, 100])
        assert await walk(store, limit, **params) == reference(docs, params), params


async def test_an_imported_document_is_found_as_if_the_service_had_stored_it(
    store: DocumentStore,
) -> None:
    sub_millisecond = datetime(2026, 9, 2, 0, 0, 0, 600, tzinfo=UTC)
    doc = imported(1, tags=[" Finance", "finance", "Q3"], created_at=sub_millisecond)
    doc = doc.model_copy(update={"updated_at": sub_millisecond.replace(tzinfo=None)})
    assert await store.import_documents([as_stored(doc)])
    assert await walk(store, 5, tag=["finance", "q3"]) == [doc.id]
    # .0006 is before .001 in every order: the time is kept to the millisecond, as stored.
    window = {"created_after": "2026-09-02T00:00:00.001Z", "updated_before": "2026-09-03T00:00:00Z"}
    for sort in ("-created_at", "-updated_at"):
        assert await walk(store, 5, sort=sort, **window) == []
    assert (await store.get(doc.id)).created_at == sub_millisecond.replace(microsecond=0)


async def test_a_bound_past_the_calendar_is_after_every_document(store: DocumentStore) -> None:
    """A bound past 9999-12-31T23:59:59.999 is the last instant Python has, .999999: SQLite
    rounded it up, past the last stored millisecond, while MongoDB cut it down to that one."""
    last = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    doc = imported(1, created_at=last, updated_at=last)
    assert await store.import_documents([doc])
    past = "9999-12-31T23:59:59.9991Z"
    for name in ("created", "updated"):
        assert await walk(store, 5, **{f"{name}_after": past}) == []
        assert await walk(store, 5, **{f"{name}_before": past}) == [doc.id]


async def test_a_change_to_a_document_created_in_the_future_is_dated_no_earlier(
    store: DocumentStore,
) -> None:
    """An import may date a document's creation in the future; a PATCH dated it now, before
    its creation, and `import` then refused what `export` wrote of it."""
    future = imported(1, created_at=datetime(9999, 1, 1, tzinfo=UTC))
    future = future.model_copy(update={"updated_at": future.created_at})
    assert await store.import_documents([future])
    changed = await store.update(future.id, DocumentUpdate(title="changed"))
    assert changed.updated_at == future.created_at
    assert check_stored(Document.model_validate_json(changed.json_bytes)) == changed


async def test_a_sparse_query_fills_every_page_but_the_last(tmp_path: Path) -> None:
    # Two tags on half the documents each that meet three times, far apart.
    both = {7, 1_201, 2_498}
    store = SQLiteStore.open(tmp_path)
    async with anyio.create_task_group() as tasks:
        for n in range(2_500):
            doc = imported(n, tags=["a", "b"] if n in both else ["ab"[n % 2]])
            tasks.start_soon(store.import_documents, [doc])
    pages = []
    after = None
    while True:
        items, after = await store.page(DocumentQuery(tag=["a", "b"]), limit=2, after=after)
        pages.append([doc.id for doc in items])
        if after is None:
            break
    await store.close()
    assert pages == [[imported(2_498).id, imported(1_201).id], [imported(7).id]]


async def test_a_search_walked_newest_first_finds_every_match_after_writes(tmp_path: Path) -> None:
    """50 000 documents with a common word, then updates, deletes and newer documents: SQLite
    before 3.42 skipped matches when FTS5 walked its rowids down from a page's bound, and the
    newest-first walk of `q` missed hundreds of them where oldest-first found all. Seeded:
    the same documents and writes every run."""
    seeded = random.Random(2)
    busy = [seeded.randint(0, 10**9) for _ in range(100)]

    def made(n: int, at: datetime) -> Document:
        doc_id = "".join(seeded.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(26))
        title = "common " + " ".join(seeded.sample(["alpha", "beta", "gamma", "delta"], 2))
        return imported(n, title, " ".join(f"w{i}" for i in range(120)), created_at=at).model_copy(
            update={"id": doc_id, "updated_at": at}
        )

    def created() -> datetime:
        """A few in the first and last milliseconds there are, a fifth in 100 busy ones."""
        if (x := seeded.random()) < 0.04:
            edge = datetime(1, 1, 1, tzinfo=UTC) if x < 0.02 else datetime.max.replace(tzinfo=UTC)
            return edge + timedelta(milliseconds=seeded.randint(0, 5) * (1 if x < 0.02 else -1))
        at = seeded.choice(busy) if x < 0.2 else seeded.randint(0, 10**9)
        return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(milliseconds=at)

    store = SQLiteStore.open(tmp_path)
    try:
        docs = [made(n, created()) for n in range(50_000)]
        for start in range(0, len(docs), 512):
            await store.import_documents(docs[start : start + 512])
        ids = [doc.id for doc in docs]
        for n in range(1_500):
            if (choice := seeded.random()) < 0.3:
                at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(milliseconds=n)
                new = made(n, at)
                assert await store.import_documents([new])
                ids.append(new.id)
            elif choice < 0.8:
                title = " ".join(seeded.sample(["alpha", "beta", "gamma"], 2))
                await store.update(seeded.choice(ids), DocumentUpdate(title=title))
            else:
                ids.remove(gone := seeded.choice(ids))
                await store.delete(gone)
        newest_first = await walk(store, 100, q="common")
        assert newest_first == (await walk(store, 100, q="common", sort="created_at"))[::-1]
    finally:
        await store.close()


LISTINGS: list[dict[str, Any]] = [
    {},
    {"sort": "created_at", "created_after": "2026-01-01T00:00:00Z"},
    {"sort": "-updated_at", "updated_before": "2026-01-01T00:00:00Z"},
    {"q": "alpha beta"},
    {"q": "alpha", "tag": ["x"], "sort": "-updated_at"},
    {"tag": ["x", "y"], "metadata.n": "1"},
    {"tag": ["x"], "sort": "updated_at"},
    {"metadata.n": "1", "metadata.k": "true"},
    {"metadata.n": "1", "sort": "-updated_at"},
]


# By creation time, a page ending inside a millisecond also looks for what follows it (keys)
# and for that millisecond's matches in id order, as a page after a cursor does for the rest of
# the cursor's millisecond (here millisecond 1, from id "A").
BY_CREATION = [p for p in LISTINGS if DocumentQuery.model_validate(p).sort_field == "created_at"]
STATEMENTS: list[tuple[dict[str, Any], dict[str, Any]]] = [(p, {}) for p in LISTINGS] + [
    (p, variant) for p in BY_CREATION for variant in ({"keys": True}, {"millisecond": 1})
]


@pytest.mark.parametrize(("params", "variant"), STATEMENTS)
def test_every_listing_is_served_by_an_index(
    tmp_path: Path, params: dict[str, Any], variant: dict[str, Any]
) -> None:
    query = DocumentQuery.model_validate(params)
    SQLiteStore.open(tmp_path).close_sync()
    sql, values = page_sql(query, 21, (1, "A"), **variant)
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", values)]
    conn.close()
    # A scan walks an index (in the order asked for) or the words' index; never the table.
    scans = [step for step in plan if step.startswith(("SCAN d", "SCAN t", "SCAN w"))]
    assert scans or all(
        step.startswith(("SEARCH", "CO-ROUTINE", "SCAN (", "USE", "CORR")) for step in plan
    )
    assert all("INDEX" in step or "VIRTUAL TABLE" in step for step in scans), plan


async def test_indexes_follow_updates_and_deletes_across_a_reopen(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    kept, _ = await store.create(body("Crème", ["t"], metadata={"n": 1}))
    renamed, _ = await store.create(body("old", ["t"], metadata={"n": 2}))
    gone, _ = await store.create(body("gone", ["t"], metadata={"n": 1}))
    await store.update(renamed.id, DocumentUpdate(title="new", tags=["u"], metadata={"n": 1}))
    await store.delete(gone.id)
    await store.close()
    store = SQLiteStore.open(tmp_path)
    assert await walk(store, 5, q="creme", tag=["t"], **{"metadata.n": "1"}) == [kept.id]
    assert await walk(store, 5, q="new", tag=["u"], **{"metadata.n": "1"}) == [renamed.id]
    assert await walk(store, 5, q="old") == await walk(store, 5, q="gone") == []
    assert await walk(store, 5, tag=["t"]) == [kept.id]
    assert await walk(store, 5, sort="-updated_at") == [renamed.id, kept.id]
    await store.close()


@pytest.mark.parametrize("shape", ["a thousand words", "fifty metadata values"])
async def test_a_page_holds_the_large_documents_that_fit_whatever_is_stored_beside_them(
    store: DocumentStore, shape: str
) -> None:
    """A page holds what fits in 1 MiB of the JSON it sends: MongoDB had sized documents as
    it stores them, words (never sent) and metadata pairs included, and ended pages early."""
    if shape == "a thousand words":
        words = " ".join(f"w{i:09d}" for i in range(INDEXED_WORDS_MAX))
        fields: dict[str, Any] = {"content": words + " " * (100_000 - len(words))}
        count = 10
    else:
        fields = {"content": "a" * 51_543, "metadata": {f"k{i:02d}": 1 for i in range(50)}}
        count = 20
    for i in range(count + 1):
        await store.create(body(f"big {i}", **fields))
    items, after = await store.page(DocumentQuery(), limit=count)
    assert sum(len(doc.json_bytes) for doc in items) <= PAGE_MAX_BYTES
    assert (len(items), after is not None) == (count, True)


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """What this thread has read from files so far, SQLite's page reads included. The store's
    reads stay on it (none moves to a thread), and what other threads read (the MongoDB
    server's, a driver's) is not counted: the process's count had taken theirs in at random."""
    monkeypatch.setattr(sqlite_store, "LOOP_BUDGET_S", math.inf)

    def read() -> int:
        io = Path("/proc/thread-self/io").read_text()
        return int(re.search(r"^rchar: (\d+)$", io, re.MULTILINE)[1])  # type: ignore[index]

    return read


@pytest.mark.parametrize(
    ("params", "one_millisecond"),
    [
        ({}, False),
        ({}, True),
        ({"q": "big", "sort": "created_at"}, True),
        ({"q": "big"}, False),
        ({"tag": ["big"], "sort": "updated_at"}, False),
        ({"q": "big", "sort": "-updated_at"}, False),
        ({"metadata.n": "7"}, False),
        ({"metadata.m": "true", "sort": "created_at"}, False),
        (
            {"created_after": "2000-01-01T00:00:00Z", "created_before": "2100-01-01T00:00:00Z"},
            False,
        ),
        (
            {"updated_after": "2000-01-01T00:00:00Z", "updated_before": "2100-01-01T00:00:00Z"},
            False,
        ),
        (
            {
                "sort": "-updated_at",
                "created_after": "2000-01-01T00:00:00Z",
                "created_before": "2100-01-01T00:00:00Z",
            },
            False,
        ),
    ],
)
async def test_a_page_of_large_documents_reads_about_what_it_can_send(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bytes_read: Callable[[], int],
    params: dict[str, Any],
    one_millisecond: bool,
) -> None:
    """limit=100 over documents of 400 KB (100 000 four-byte characters): the page ends before
    1 MiB and the store reads and parses about that much, not every match, on the event loop;
    a walk still returns each once. SQLite had sorted every body of the page's matches (40 MB
    at limit 100) before the first was sent: by update time with a word or a tag, in id order
    within one millisecond, by a metadata value stored in two forms (7 and "7"), by update
    time within a creation range, and by creation time within an update range. Bodies this
    large are not kept parsed (the cache would hold megabytes each), so reading the page again
    parses them again."""
    parsed: list[int] = []
    parse = sqlite_store._parse

    def counted(body: bytes) -> Document:
        parsed.append(len(body))
        return parse(body)

    monkeypatch.setattr(sqlite_store, "_parse", counted)
    store = SQLiteStore.open(tmp_path)
    query = DocumentQuery.model_validate(params)
    big = body("big", ["big"], content="\U0001f600" * 100_000, metadata={"n": 7, "m": True})
    try:
        if one_millisecond:
            at = datetime(2026, 1, 1, tzinfo=UTC)
            docs = [new_document(big, IdGenerator()(at), at) for _ in range(30)]
            for doc in random.sample(docs, len(docs)):
                assert await store.import_documents([doc])
            made = sorted(doc.id for doc in docs)
        else:
            made = [(await store.create(big))[0].id for _ in range(30)]
        order = made if params.get("sort") in ("updated_at", "created_at") else made[::-1]
        parsed.clear()
        read = bytes_read()
        items, after = await store.page(query, limit=100)
        assert bytes_read() - read < 4 * PAGE_MAX_BYTES  # 12 MB match
        assert [doc.id for doc in items] == order[:2]
        assert after is not None
        assert len(parsed) == 2
        await store.page(query, limit=100)
        assert len(parsed) == 4
        assert await walk(store, 100, **params) == order
    finally:
        await store.close()


@pytest.mark.parametrize("sent", [0, 970])
@pytest.mark.parametrize(
    "params", [{}, {"sort": "created_at"}, {"tag": ["t"], "metadata.k": "1"}, {"q": "crowd"}]
)
async def test_a_page_inside_a_crowded_millisecond_reads_the_rows_it_sends(
    tmp_path: Path, bytes_read: Callable[[], int], params: dict[str, Any], sent: int
) -> None:
    """An import of 1 000 documents of 3 500 characters stamped with one millisecond, in random
    id order: a page of 10 in id order reads about its own rows, at the start of the millisecond
    or with most of it sent, not each row of the millisecond (4 MB a page, 400 MB a walk), nor
    each row sent before it (1-4 MB a page near the end, a walk of 16 384 read 300 MB)."""
    store = SQLiteStore.open(tmp_path)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    crowd = body("crowd", ["t"], content="c" * 3_500, metadata={"k": 1})
    docs = [new_document(crowd, IdGenerator()(at), at) for _ in range(1_000)]
    try:
        assert await store.import_documents(random.sample(docs, 1_000)) == 1_000
        query = DocumentQuery.model_validate(params)
        order = sorted(doc.id for doc in docs)[:: 1 if params.get("sort") else -1]
        read, after = bytes_read(), None if sent == 0 else (millis(at), order[sent - 1])
        for page in range(3):
            items, after = await store.page(query, limit=10, after=after)
            assert [doc.id for doc in items] == order[sent + page * 10 : sent + page * 10 + 10]
        assert after is None if sent else after is not None
        assert bytes_read() - read < 3 * 40 * 4_096  # 3 pages of 10 documents of 4 KB
    finally:
        await store.close()


async def _rows_of_a_page_each(store: SQLiteStore) -> list[Document]:
    """2 000 documents of 3.5 KB (each row fills a page of the table, so a row read is a page
    read), with a tag, a word and a number, created a millisecond apart and changed in another
    order."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    docs = [
        imported(
            n,
            "word",
            "c" * 3_500,
            tags=["t"],
            metadata={"m": 1},
            created_at=at + timedelta(milliseconds=n),
            updated_at=at + timedelta(days=1, milliseconds=n * 7_919 % 2_000),
        )
        for n in range(2_000)
    ]
    assert await store.import_documents(docs) == len(docs)
    return docs


@pytest.mark.parametrize("params", [{"tag": ["t"]}, {"q": "word"}])
@pytest.mark.parametrize("sort", ["updated_at", "-updated_at"])
async def test_pages_by_update_time_of_many_matches_read_about_what_they_send(
    tmp_path: Path, bytes_read: Callable[[], int], params: dict[str, Any], sort: str
) -> None:
    """2 000 documents of 3.5 KB with a tag and a word, changed in another order than created:
    five pages of 10 by update time read about their own rows (0.3 MB). Each page had sorted every
    match, reading its row: 13 MB a page, a walk the square of the matches (13.7 GB for 30 000
    documents of 1 KB)."""
    store = SQLiteStore.open(tmp_path)
    try:
        docs = await _rows_of_a_page_each(store)
        order = [d.id for d in sorted(docs, key=lambda d: (d.updated_at, d.id))]
        order = order if sort == "updated_at" else order[::-1]
        query = DocumentQuery.model_validate({**params, "sort": sort})
        read, after = bytes_read(), None
        for page in range(5):
            items, after = await store.page(query, limit=10, after=after)
            assert [doc.id for doc in items] == order[page * 10 : page * 10 + 10]
        assert bytes_read() - read < 1 << 20  # 5 pages of 10 documents of 3.5 KB: 175 KB
    finally:
        await store.close()


@pytest.mark.parametrize(
    "params",
    [
        {"created_before": "2027-01-01T00:00:00Z"},
        {"sort": "created_at", "created_after": "2025-01-01T00:00:00Z"},
        {
            "sort": "-updated_at",
            "created_after": "2025-01-01T00:00:00Z",
            "created_before": "2027-01-01T00:00:00Z",
        },
        {"metadata.m": "1"},
        {"metadata.m": "1", "sort": "created_at"},
    ],
    ids=[
        "newest first before a time",
        "oldest first after a time",
        "by update time in a range",
        "a number, found in its two stored forms",
        "a number, oldest first",
    ],
)
async def test_a_page_deep_in_a_walk_reads_about_what_it_sends(
    tmp_path: Path, bytes_read: Callable[[], int], params: dict[str, Any]
) -> None:
    """2 000 documents of 3.5 KB, three pages of 10 from the 1 000th on: a creation range and
    the cursor bounded the key twice, and SQLite walked from the range's end, reading every row
    before the cursor again for each page; by update time, SQLite took the keys' range and
    sorted all of it for each page (a walk the square of the range, 29-55 GB at 100 000). A
    number is found as 1 and "1", two ranges SQLite merges by sorting their keys: it read each
    remaining match's row first (2.37 GB a walk at 100 000)."""
    store = SQLiteStore.open(tmp_path)
    try:
        docs = await _rows_of_a_page_each(store)
        query = DocumentQuery.model_validate(params)
        order = sorted(docs, key=query.position, reverse=query.descending)
        after: Key | None = query.position(order[999])
        read = bytes_read()
        for page in range(3):
            items, after = await store.page(query, limit=10, after=after)
            assert items == order[1_000 + page * 10 : 1_010 + page * 10]
        assert bytes_read() - read < 1 << 20  # 3 pages of 10 documents of 3.5 KB: 105 KB
    finally:
        await store.close()


async def test_a_large_documents_words_are_found_outside_the_writer_and_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing a long text takes milliseconds (far more for text that decomposes): in the
    writer thread every other write would wait them out, on the event loop every request."""
    where: list[tuple[int, str]] = []  # (characters, thread) of each tokenized text
    tokenize = document_words

    def recorded(title: str, content: str) -> set[str]:
        loop = threading.get_ident() == loop_thread
        where.append((len(content), "loop" if loop else threading.current_thread().name))
        return tokenize(title, content)

    monkeypatch.setattr(sqlite_store, "document_words", recorded)
    loop_thread = threading.get_ident()
    store = SQLiteStore.open(tmp_path)
    big, _ = await store.create(body("big", content="\ufdfa" * 3_000))
    await store.update(big.id, DocumentUpdate(tags=["edited"]))
    await store.update(big.id, DocumentUpdate(content="\ufdfa" * 4_000))
    assert await walk(store, 5, q="\ufdfa") == [big.id]
    await store.delete(big.id)
    assert await walk(store, 5, q="\ufdfa") == []
    await store.create(body("small"))
    await store.close()
    assert [size for size, _ in where] == [3_000, 4_000, 1]  # a delete finds none
    assert {thread for _, thread in where[:-1]} <= {"AnyIO worker thread"}
    assert where[-1][1] == "loop"


async def test_racing_edits_of_a_large_document_never_find_words_in_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edits read the same version and find its words in threads; the first to write changes
    the text under the others, which read again rather than find words in the writer thread,
    where every other write would wait. The index ends as the last text says."""
    threads: list[str] = []
    tokenize = document_words

    def recorded(title: str, content: str) -> set[str]:
        threads.append(threading.current_thread().name)
        return tokenize(title, content)

    monkeypatch.setattr(sqlite_store, "document_words", recorded)
    store = SQLiteStore.open(tmp_path)
    try:
        big, _ = await store.create(body("big", content="\ufdfa" * 3_000))
        long = "\ufdfa" * 3_000
        edits = [DocumentUpdate(content=f"{long} edit{n}") for n in range(4)]
        await asyncio.gather(*(store.update(big.id, edit) for edit in edits))
        final = await store.get(big.id)
        assert final.version == 5
        for n in range(4):
            expected = [big.id] if final.content.endswith(f"edit{n}") else []
            assert await walk(store, 5, q=f"edit{n}") == expected
        # The update finds the document deleted, or is written before the delete, which reads again.
        await asyncio.gather(
            store.update(big.id, edits[0]), store.delete(big.id), return_exceptions=True
        )
        assert await walk(store, 5, q="\ufdfa") == []
        with pytest.raises(DocumentNotFound):
            await store.get(big.id)
    finally:
        await store.close()
    assert set(threads) == {"AnyIO worker thread"}


@pytest.mark.parametrize("backend", ["sqlite", "mongodb"])
async def test_racing_edits_of_one_document_find_its_words_once_each(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """Edits of one document wait for each other in the process: racing, each would find the
    words again after every other's write (40 edits of a large document cost 40 s of CPU)."""
    module = sqlite_store if backend == "sqlite" else mongo_store
    found = 0
    tokenize = document_words

    def counted(title: str, content: str) -> set[str]:
        nonlocal found
        found += 1
        return tokenize(title, content)

    monkeypatch.setattr(module, "document_words", counted)
    inner: DocumentStore = (
        SQLiteStore.open(tmp_path)
        if backend == "sqlite"
        else await MongoStore.open(request.getfixturevalue("mongo_url"), serving=False)
    )
    store = MeteredStore(inner, Metrics())
    try:
        doc, _ = await store.create(body("race", content="\u03ac" * 5_000))
        edits = [DocumentUpdate(title=f"v{n}") for n in range(8)]
        await asyncio.gather(*(store.update(doc.id, edit) for edit in edits))
        assert (await store.get(doc.id)).version == 9
        assert found <= 1 + 2 * len(edits)  # the create's, then each edit's old and new text
    finally:
        await store.close()


async def test_a_second_store_on_the_directory_shares_the_data(tmp_path: Path) -> None:
    first, second = SQLiteStore.open(tmp_path), SQLiteStore.open(tmp_path)
    doc, _ = await first.create(body("shared"))
    assert await second.get(doc.id) == doc
    updated = await second.update(doc.id, DocumentUpdate(title="changed"), if_version=1)
    with pytest.raises(PreconditionFailed):
        await first.update(doc.id, DocumentUpdate(title="lost"), if_version=1)
    assert await first.get(doc.id) == updated
    assert await first.cursor_secret() == await second.cursor_secret()
    assert len(await first.cursor_secret()) == 32
    await first.close()
    await second.close()


@pytest.mark.parametrize("backend", ["sqlite", "mongodb"])
async def test_probes_count_at_most_every_few_seconds_and_see_the_process_own_writes_at_once(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """/health/ready and /metrics show the documents count, and anyone may send them: a count
    walks an index (SQLite) or may walk the collection (some MongoDB servers), so it is reused
    for a few seconds, and this process's own writes change it without a count."""

    async def opened() -> DocumentStore:
        if backend == "sqlite":
            return SQLiteStore.open(tmp_path)
        return await MongoStore.open(request.getfixturevalue("mongo_url"), serving=False)

    probed, other = MeteredStore(await opened(), Metrics()), await opened()
    try:
        assert await probed.count() == 0
        await other.create(body("elsewhere"))
        assert await probed.count() == 0  # not counted again: no count per probe
        here, _ = await probed.create(body("here"))
        assert await probed.count() == 1  # its own write, and still no count
        await probed.delete(here.id)
        assert await probed.count() == 0
    finally:
        await probed.close()
        await other.close()


async def test_a_create_refused_for_a_full_millisecond_leaves_its_idempotency_key_unused(
    tmp_path: Path,
) -> None:
    """One millisecond holds a bounded number of documents: a create past it is refused and
    records nothing, so its retry is refused alike, not taken for a replay of a deleted one."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    store = SQLiteStore.open(tmp_path, clock=lambda: at)
    try:
        await fill_millisecond(store, at)
        for _ in range(2):
            with pytest.raises(DocumentInvalid, match="one millisecond"):
                await store.create(body("late"), idempotency=IdempotencyKey("alice", "k"))
    finally:
        await store.close()


async def test_idempotency_races_between_two_stores_create_one_document(tmp_path: Path) -> None:
    stores = [SQLiteStore.open(tmp_path), SQLiteStore.open(tmp_path)]
    key = IdempotencyKey("alice", "k1")
    results: list[tuple[Document, bool]] = []

    async def create(store: SQLiteStore) -> None:
        results.append(await store.create(body("once"), idempotency=key))

    async with anyio.create_task_group() as tasks:
        for n in range(10):
            tasks.start_soon(create, stores[n % 2])
    assert len({doc.id for doc, _ in results}) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 9
    assert await stores[0].count() == 1
    for store in stores:
        await store.close()


async def test_two_stores_creating_in_one_millisecond_take_turns_without_refusal(
    tmp_path: Path,
) -> None:
    """Two workers' ids of one millisecond are unrelated random numbers: each created document
    used to land between the other's, halving the room there, and the seventh in one gap got
    409 "too many documents created in one millisecond"; the bound is 16 384."""
    at = datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    stores = [SQLiteStore.open(tmp_path, clock=lambda: at) for _ in range(2)]
    try:
        made = [(await stores[n % 2].create(body(f"d{n}")))[0] for n in range(200)]
        assert {doc.created_at for doc in made} == {at}
        page, _ = await stores[0].page(DocumentQuery(sort="created_at"), limit=200)
        assert [doc.id for doc in page] == sorted(doc.id for doc in made)
    finally:
        for store in stores:
            await store.close()


async def test_a_backup_under_writes_holds_every_earlier_acknowledged_document(
    tmp_path: Path,
) -> None:
    store = SQLiteStore.open(tmp_path / "data")
    before = [(await store.create(body(f"d{i}")))[0].id for i in range(50)]

    async def keep_writing() -> None:
        for i in range(200):
            await store.create(body(f"later{i}"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(keep_writing)
        await anyio.to_thread.run_sync(store.backup, tmp_path / "copy.db")
    await store.close()
    restored = tmp_path / "restored"
    restored.mkdir()
    (tmp_path / "copy.db").rename(restored / DATABASE_FILE)
    copy = SQLiteStore.open(restored)
    ids = {doc.id for doc in await exported(copy)}
    assert set(before) <= ids
    await copy.close()


async def test_closed_store_raises_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get("x")
    with pytest.raises(StoreUnavailable):
        await store.create(body())


async def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    created: list[str] = []

    async def writer(n: int) -> None:
        for i in range(40):
            doc, _ = await store.create(body(f"w{n}-{i}"))
            created.append(doc.id)

    async with anyio.create_task_group() as tasks:
        for n in range(8):
            tasks.start_soon(writer, n)
    await store.close()
    reopened = SQLiteStore.open(tmp_path)
    assert sorted(d.id for d in await exported(reopened)) == sorted(created)
    assert len(created) == 320
    await reopened.close()


# --- the file at start ------------------------------------------------------------------------


def _refused(data_dir: Path, name: str) -> StoreCorrupt:
    """The refusal naming `name`, every file left as it was (the -shm file, an index SQLite
    rebuilds from the WAL, is left in place but may be rebuilt), a damage report that earlier
    processes left among them (a refused start had removed it)."""
    (data_dir / sqlite_store.DAMAGE_FILE).write_text("database disk image is malformed")

    def files() -> dict[str, bytes]:
        return {
            p.name: b"" if p.name.endswith("-shm") else p.read_bytes()
            for p in data_dir.iterdir()
            if p.is_file()
        }

    before = files()
    with pytest.raises(StoreCorrupt) as caught:
        SQLiteStore.open(data_dir).close_sync()  # closed if it opens: its writer would stay
    assert str(data_dir / name) in str(caught.value)
    assert files() == before
    return caught.value


@pytest.mark.parametrize("content", [b"", b"{}", b"SQLite format 3", b"\x00garbage" * 20])
def test_a_database_file_that_is_not_sqlite_is_refused_untouched(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / DATABASE_FILE).write_bytes(content)
    _refused(tmp_path, DATABASE_FILE)


@pytest.mark.parametrize("wal", [None, b"", b"\0" * 4096], ids=["alone", "empty WAL", "small WAL"])
async def test_a_truncated_database_is_refused_untouched(tmp_path: Path, wal: bytes | None) -> None:
    """Beside a WAL (a kill -9 leaves one) it was let through, as a checkpoint cut short would
    be, and served: a WAL too small to hold the missing pages cannot finish one."""
    store = SQLiteStore.open(tmp_path)
    for _ in range(30):
        await store.create(body("x" * 100, content="y" * 5000))
    await store.close()
    path = tmp_path / DATABASE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if wal is not None:
        (tmp_path / f"{DATABASE_FILE}-wal").write_bytes(wal)
    _refused(tmp_path, DATABASE_FILE)


def _beside_a_wal_of(path: Path, change: str) -> None:
    """`path` as a kill -9 leaves it: as it was, beside the WAL of `change`, its last
    transactions, and the shared-memory file that indexes it."""
    file = path.read_bytes()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.executescript(change)
    beside = {name: path.with_name(DATABASE_FILE + name).read_bytes() for name in ("-wal", "-shm")}
    conn.close()  # checkpoints the WAL into the file and removes it
    path.write_bytes(file)
    for name, content in beside.items():
        path.with_name(DATABASE_FILE + name).write_bytes(content)


@pytest.mark.parametrize(
    "damage",
    [
        lambda wal: os.urandom(len(wal)),
        lambda wal: b"\x00" + wal[1:],  # the magic number
        lambda wal: wal[:4] + bytes(4) + wal[8:],  # the format version
        lambda wal: wal[:8] + (1000).to_bytes(4) + wal[12:],  # the page size
        lambda wal: wal[:16] + bytes([wal[16] ^ 1]) + wal[17:],  # a salt: the checksum fails
        lambda wal: bytes(32) + wal[32:],
    ],
    ids=["garbage", "magic", "version", "page size", "checksum", "zeroed"],
)
def test_a_wal_whose_header_is_damaged_is_refused_untouched(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    """SQLite reads such a WAL as empty: the start went on, and every write the WAL held, left
    there by a kill -9, was gone."""
    SQLiteStore.open(tmp_path).close_sync()
    path = tmp_path / DATABASE_FILE
    _beside_a_wal_of(path, "INSERT INTO meta VALUES ('written', 1)")
    wal = path.with_name(f"{DATABASE_FILE}-wal")
    assert wal.stat().st_size > 32
    wal.write_bytes(damage(wal.read_bytes()))
    assert "header is damaged" in str(_refused(tmp_path, wal.name))
    _follow_the_advice_to_set_aside(tmp_path)


def _follow_the_advice_to_set_aside(data_dir: Path) -> None:
    """Move the WAL and the -shm file aside, as the refusal says: the next start opens (the
    WAL alone had been refused again, as missing the frames the -shm counts)."""
    for name in ("-wal", "-shm"):
        path = data_dir / f"{DATABASE_FILE}{name}"
        path.rename(path.with_name(f"{path.name}.aside"))
    SQLiteStore.open(data_dir).close_sync()


async def test_a_backup_named_as_one_of_the_stores_files_is_refused_and_so_is_a_journal(
    tmp_path: Path,
) -> None:
    """`backup data/documents.db-journal` wrote it, and every start after failed with "attempt to
    write a readonly database": SQLite took the copy for a transaction to play back. So did
    `data/../data/documents.db-journal`, and `data/documents.damaged` made readiness say the
    database was damaged, with the whole copy as the reason. The store's names in the data
    directory are refused however the path spells it; a journal beside the database, which the
    store never writes, is refused naming it."""
    data_dir = tmp_path / "data"
    (tmp_path / "link").symlink_to(data_dir)
    store = SQLiteStore.open(data_dir)
    try:
        await store.create(body("kept"))
        names = [f"{DATABASE_FILE}{end}" for end in ("-journal", "-wal", "-shm")]
        names += [sqlite_store.DAMAGE_FILE, LEGACY_FILE, LEGACY_JOURNAL, LEGACY_LOCK]
        for name in names:
            for target in (
                data_dir / name,
                data_dir / ".." / "data" / name,
                tmp_path / "link" / name,
            ):
                listed = sorted(p.name for p in data_dir.iterdir())
                with pytest.raises(StoreUnavailable, match=r"exists|the store's own files"):
                    store.backup(target)
                assert sorted(p.name for p in data_dir.iterdir()) == listed
        store.backup(data_dir / "copy.db")  # any other name
    finally:
        await store.close()
    journal = data_dir / f"{DATABASE_FILE}-journal"
    journal.write_bytes((data_dir / "copy.db").read_bytes())
    assert "rollback journal" in str(_refused(data_dir, journal.name))
    journal.write_bytes(b"")  # an empty one holds no transaction: SQLite ignores it
    SQLiteStore.open(data_dir).close_sync()


async def test_a_backup_never_follows_a_link_planted_where_it_writes_its_copy(
    tmp_path: Path,
) -> None:
    """The copy was written under `.PID.backup-partial` beside the target, through a link
    planted there: the copy went elsewhere, and the backup was a link to it."""
    store = SQLiteStore.open(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere.db"
    (tmp_path / f".{os.getpid()}.backup-partial").symlink_to(elsewhere)
    try:
        await store.create(body("kept"))
        store.backup(tmp_path / "backup.db")
    finally:
        await store.close()
    assert not elsewhere.exists()
    assert not (tmp_path / "backup.db").is_symlink()
    with contextlib.closing(sqlite3.connect(tmp_path / "backup.db")) as copy:
        assert copy.execute("SELECT count(*) FROM documents").fetchone() == (1,)


def test_a_data_directory_given_as_a_relative_path_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` serves `./data`: a relative path has no file URI, and every start failed."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # made, then found
        SQLiteStore.open(Path("data")).close_sync()


_WRITE_AND_DIE = """
import os, shutil, signal, sqlite3, sys
path = os.path.join(sys.argv[1], "documents.db")
conn = sqlite3.connect(path, isolation_level=None)
def write(count):
    for _ in range(count):
        conn.execute("INSERT INTO meta VALUES (hex(randomblob(8)), randomblob(3000))")
write(20)
shutil.copy(path + "-shm", path + "-shm.earlier")  # as a power loss may leave it, not synced
if sys.argv[2] != "plain":
    conn.execute("PRAGMA wal_checkpoint")  # every frame copied into the database
if sys.argv[2] == "restarted":
    write(2)  # the next generation of the WAL, written over the first from its start
    shutil.copy(path + "-wal", path + "-wal.older")
    write(10)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writing(data_dir: Path, how: str = "plain") -> Path:
    """The store's database as a process killed (-9) after its writes leaves it, beside its WAL
    and shared-memory file: 20 commits, then (`how`) a checkpoint, then 12 more commits in
    the WAL's next generation. Returns the WAL."""
    SQLiteStore.open(data_dir).close_sync()
    script = [sys.executable, "-c", _WRITE_AND_DIE, str(data_dir), how]
    assert subprocess.run(script, check=False).returncode == -9
    return data_dir / f"{DATABASE_FILE}-wal"


def _written(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / DATABASE_FILE)) as conn:
        count: int = conn.execute(
            "SELECT count(*) FROM meta WHERE length(value) = 3000"
        ).fetchone()[0]
        return count


@pytest.mark.parametrize(
    "cut",
    ["emptied", "halved", "removed", "an older copy", "another database's", "a frame damaged"],
)
def test_a_wal_cut_or_replaced_after_a_kill_is_refused_untouched(tmp_path: Path, cut: str) -> None:
    """A killed process's last writes are in its WAL, which the shared-memory file left beside
    it counts. The WAL emptied, cut, removed or replaced by an older copy was read as holding
    no more: the start answered ready without them, and wrote over what was left. Another
    database's was served in its place once every frame had been copied. SQLite replays no
    frame after one damaged inside its page: a start answered ready without all of them."""
    wal = _killed_writing(tmp_path, "restarted" if cut == "an older copy" else "plain")
    if cut == "removed":
        wal.unlink()
    elif cut == "an older copy":
        wal.with_name(f"{wal.name}.older").replace(wal)
    elif cut == "a frame damaged":  # a byte inside its first frame's page: the checksum fails
        with wal.open("r+b") as file:
            file.seek(32 + 24 + 100)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
    elif cut == "another database's":
        _killed_writing(tmp_path / "other").replace(_killed_writing(tmp_path, "checkpointed"))
        shutil.rmtree(tmp_path / "other")
    else:
        wal.write_bytes(wal.read_bytes()[: wal.stat().st_size // 2 if cut == "halved" else 0])
    assert "not holding the writes its index" in str(_refused(tmp_path, wal.name))


@pytest.mark.parametrize(
    ("how", "then"),
    [
        ("plain", ""),
        ("checkpointed", ""),
        ("checkpointed", "WAL removed"),
        ("restarted", ""),
        ("restarted", "-shm of an earlier generation"),
    ],
    ids=[
        "as left",
        "copied",
        "copied, then removed",
        "in its next generation",
        "in its next generation, beside an earlier -shm",
    ],
)
def test_a_kill_leaves_every_write_and_no_refusal(tmp_path: Path, how: str, then: str) -> None:
    """Nor is a WAL whose frames were all copied into the database refused for being gone (a
    stop killed between removing it and the -shm file). The -shm file is never synced: after
    a power loss it may index an earlier generation of the WAL, whose frames were all copied
    before the next began; SQLite rebuilds it from the WAL, and every start had been refused."""
    wal = _killed_writing(tmp_path, how)
    earlier = tmp_path / f"{DATABASE_FILE}-shm.earlier"
    if then == "WAL removed":
        wal.unlink()
    elif then:
        earlier.replace(tmp_path / f"{DATABASE_FILE}-shm")
    earlier.unlink(missing_ok=True)
    SQLiteStore.open(tmp_path).close_sync()
    assert _written(tmp_path) == (32 if how == "restarted" else 20)


@pytest.mark.parametrize("whose", ["another database's", "its own", "its own, copied"])
def test_a_wal_beside_no_shared_memory_file_is_refused_untouched(
    tmp_path: Path, whose: str
) -> None:
    """SQLite leaves a WAL without its -shm file only when a stop is killed between removing
    the -shm and the WAL, every page copied into the database: that one starts. Another
    database's, beside one stopped cleanly, was replayed over it: its documents replaced by the
    other's, with readiness 200. Its own with writes not yet copied, its -shm removed, starts
    once an empty -shm file is put beside it, as the refusal says."""
    if whose.startswith("its own"):
        wal = _killed_writing(tmp_path, "checkpointed" if whose.endswith("copied") else "plain")
        (tmp_path / f"{DATABASE_FILE}-shm").unlink()
    else:
        SQLiteStore.open(tmp_path).close_sync()
        wal = _killed_writing(tmp_path / "other").replace(tmp_path / f"{DATABASE_FILE}-wal")
        shutil.rmtree(tmp_path / "other")
    (tmp_path / f"{DATABASE_FILE}-shm.earlier").unlink(missing_ok=True)
    if whose == "its own, copied":
        SQLiteStore.open(tmp_path).close_sync()
        assert _written(tmp_path) == 20
        return
    assert "beside no documents.db-shm" in str(_refused(tmp_path, wal.name))
    if whose == "its own":
        (tmp_path / f"{DATABASE_FILE}-shm").touch()
        SQLiteStore.open(tmp_path).close_sync()
        assert _written(tmp_path) == 20


@pytest.mark.parametrize("existed", [False, True], ids=["first start", "later start"])
def test_a_start_removes_what_a_start_killed_while_making_the_database_left(
    tmp_path: Path, existed: bool
) -> None:
    """The empty database is made under another name, then linked into place: a kill in between
    left it (with its journal or WAL) beside the database for good."""
    if existed:
        SQLiteStore.open(tmp_path).close_sync()
    left = [f"{DATABASE_FILE}.4242-139712.new{name}" for name in ("", "-journal", "-wal", "-shm")]
    kept = [f"{DATABASE_FILE}.2024-06-01.new", f"{DATABASE_FILE}.mine.new"]  # not its names
    for name in [*left, *kept]:
        (tmp_path / name).write_bytes(b"x")
    SQLiteStore.open(tmp_path).close_sync()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATABASE_FILE, *kept]


def test_a_refused_start_leaves_what_a_killed_start_left(tmp_path: Path) -> None:
    """They had been removed before the checks, so a refused start changed the directory."""
    left = tmp_path / f"{DATABASE_FILE}.4242-139712.new"
    left.write_bytes(b"x")
    (tmp_path / DATABASE_FILE).write_bytes(b"not a database")
    with pytest.raises(StoreCorrupt):
        SQLiteStore.open(tmp_path)
    assert left.read_bytes() == b"x"


def test_a_wal_whose_database_is_missing_is_refused_untouched(tmp_path: Path) -> None:
    """`documents.db` removed after a kill -9: a new, empty database was made beside the WAL,
    which SQLite then read as its own, and the service answered ready with no documents."""
    SQLiteStore.open(tmp_path).close_sync()
    _beside_a_wal_of(tmp_path / DATABASE_FILE, "INSERT INTO meta VALUES ('written', 1)")
    (tmp_path / DATABASE_FILE).unlink()
    assert "is missing" in str(_refused(tmp_path, f"{DATABASE_FILE}-wal"))
    _follow_the_advice_to_set_aside(tmp_path)


@pytest.mark.parametrize(
    "wal", [b"\x00" * 31, b"\x00" * 4096, b"torn"], ids=["zeros", "a page of zeros", "short"]
)
async def test_a_wal_that_holds_no_frame_is_no_damage(tmp_path: Path, wal: bytes) -> None:
    """SQLite reads it as empty, as it is: nothing is lost, and nothing is refused."""
    store = SQLiteStore.open(tmp_path)
    made, _ = await store.create(body("kept"))
    await store.close()
    (tmp_path / f"{DATABASE_FILE}-wal").write_bytes(wal)
    store = SQLiteStore.open(tmp_path)
    try:
        assert await store.get(made.id) == made
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("holds", "damaged"),
    [(False, False), (True, False), (True, True)],
    ids=["other pages", "the pages cut off", "the pages cut off, one damaged"],
)
async def test_a_database_shorter_than_its_header_beside_a_wal_opens_only_if_the_wal_holds_the_rest(
    tmp_path: Path, holds: bool, damaged: bool
) -> None:
    """A checkpoint cut short leaves the file shorter than its header says, beside a WAL that
    holds the rest. A WAL of other pages (a truncated file beside a kill -9's WAL) was let
    through as large enough, and half the documents were unreadable. A frame damaged in the WAL
    ends what SQLite replays: refused, and the refused start's close had removed the WAL."""
    store = SQLiteStore.open(tmp_path)
    for _ in range(30):
        await store.create(body("x" * 100, content="y" * 5000))
    await store.close()
    path = tmp_path / DATABASE_FILE
    # Many transactions of one page: a WAL larger than the pages cut off, holding none of them.
    change = "UPDATE documents SET version = version + 1 WHERE n = (SELECT min(n) FROM documents);"
    _beside_a_wal_of(path, "VACUUM" if holds else change * 200)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if damaged:  # a page's bytes in a frame half-way through: its checksum no longer matches
        wal = bytearray((tmp_path / f"{DATABASE_FILE}-wal").read_bytes())
        frame = 24 + int.from_bytes(wal[8:12])
        middle = 32 + frame * (len(wal) // frame // 2) + 100
        wal[middle : middle + 16] = b"\xff" * 16
        (tmp_path / f"{DATABASE_FILE}-wal").write_bytes(wal)
    if damaged or not holds:
        _refused(tmp_path, DATABASE_FILE)
        return
    store = SQLiteStore.open(tmp_path)
    try:
        items, _ = await store.page(DocumentQuery(), limit=50)
        assert len(items) == 30
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("PRAGMA user_version = 99", "newer version"),
        ("CREATE TRIGGER t AFTER INSERT ON documents BEGIN SELECT 1; END", "in: t"),
        ("PRAGMA application_id = 7", "another application"),
    ],
    ids=["of a newer version", "its schema changed by hand", "marked as another's"],
)
async def test_a_backup_that_cannot_be_used_is_refused_before_the_wal_beside_it_is_moved(
    tmp_path: Path, change: str, named: str
) -> None:
    """A backup that would be refused, put in place beside the replaced database's WAL: that
    WAL had been set aside before the refusal, which said the files were left untouched, and
    with the replaced database put back, its writes in that WAL were not served."""
    store = SQLiteStore.open(tmp_path / "live")
    await store.create(body("kept"))
    store.backup(tmp_path / ("b" * 250))  # as long a name as the filesystem takes
    await store.close()
    with sqlite3.connect(tmp_path / ("b" * 250)) as conn:
        conn.executescript(change)
    conn.close()
    (tmp_path / ("b" * 250)).rename(tmp_path / "live" / DATABASE_FILE)
    (tmp_path / "live" / f"{DATABASE_FILE}-wal").write_bytes(b"the replaced database's")
    assert named in str(_refused(tmp_path / "live", DATABASE_FILE))


@pytest.mark.parametrize(
    "make",
    [
        "CREATE TABLE x (a)",
        "PRAGMA application_id = 7",
        "CREATE TABLE documents (a); PRAGMA user_version = 2",
        "CREATE TABLE x (a); PRAGMA user_version = 99",
        "CREATE TABLE documents (x); CREATE TABLE words (y); CREATE TABLE meta (z);"
        " PRAGMA user_version = 3",
    ],
    ids=[
        "unmarked, with tables",
        "marked by another application",
        "unmarked, with a schema version of its own",
        "unmarked, with a schema version past this store's",
        "unmarked, with some of this store's table names",
    ],
)
@pytest.mark.parametrize("in_wal", [False, True], ids=["in the file", "in the WAL"])
def test_another_application_s_database_is_refused_untouched(
    tmp_path: Path, make: str, in_wal: bool
) -> None:
    """Adopted, it was migrated in place and served as an empty store; marked in the WAL a kill
    -9 left (the header read before SQLite opens the file is the file's own), it was served,
    then refused at the next start."""
    if in_wal:
        sqlite3.connect(tmp_path / DATABASE_FILE).execute(
            "PRAGMA journal_mode = WAL"
        ).connection.close()
    _damage(tmp_path / DATABASE_FILE, make, in_wal)
    refused = str(_refused(tmp_path, DATABASE_FILE))
    # Unmarked, it may be this store's from before it marked its files: its schema tells.
    said = ("another application", "schema is not this version's", "newer version")
    assert any(phrase in refused for phrase in said[: 1 if "application_id" in make else 3])


def test_this_store_s_database_from_before_it_marked_its_files_is_opened(tmp_path: Path) -> None:
    SQLiteStore.open(tmp_path).close_sync()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        conn.execute("PRAGMA application_id = 0")
    conn.close()
    SQLiteStore.open(tmp_path).close_sync()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("DROP TABLE documents", "not this version's in: documents"),
        ("DROP TABLE words", "words"),
        ("DROP TABLE words_data", "words_data"),  # one of the words' index's own
        ("DROP TABLE words_config", "words_config"),
        ("DROP INDEX documents_created", "documents_created"),
        ("DROP INDEX documents_updated; ALTER TABLE documents DROP COLUMN updated", "documents"),
        ("DROP TABLE metadata; CREATE VIEW metadata AS SELECT 1 AS key, 2 AS value", "metadata"),
        ("ALTER TABLE documents ADD COLUMN x", "documents"),
        (
            "DROP INDEX documents_created; CREATE INDEX documents_created ON documents (id)",
            "documents_created",
        ),
        (
            "CREATE TRIGGER gone AFTER INSERT ON documents BEGIN DELETE FROM documents"
            " WHERE n = new.n; END",
            "gone",
        ),
        (
            "DROP TABLE words; CREATE VIRTUAL TABLE words USING fts5 (terms, content='',"
            " tokenize='porter', detail='none')",
            "words",
        ),
        (
            "CREATE TRIGGER sqlitexstat1 AFTER INSERT ON documents BEGIN DELETE FROM documents"
            " WHERE n = new.n; END",
            "sqlitexstat1",
        ),
        (
            "PRAGMA writable_schema = ON; UPDATE sqlite_master SET sql = replace(sql,"
            " 'body BLOB NOT NULL', '\"body BLOB\" NOT NULL') WHERE name = 'documents'",
            "documents",
        ),
        ("DELETE FROM meta", "cursor secret is missing"),
        ("UPDATE meta SET value = 'abc'", "cursor secret is missing or not 32 bytes"),
        ("UPDATE meta SET value = 7", "cursor secret is missing or not 32 bytes"),
    ],
)
@pytest.mark.parametrize("in_wal", [False, True], ids=["in the file", "in the WAL"])
def test_a_database_missing_part_of_its_schema_is_refused(
    tmp_path: Path, damage: str, named: str, in_wal: bool
) -> None:
    """It started and was ready: the reads or the writes that needed the part then failed (503,
    "no such table"), a listing without its index scanned, or the start failed with a traceback
    for the cursor secret. Left in the WAL by a kill -9, the change was folded into the file and
    the WAL removed by the refused start's close, which said the file was left untouched."""
    SQLiteStore.open(tmp_path).close_sync()
    _damage(tmp_path / DATABASE_FILE, damage, in_wal)
    assert named in str(_refused(tmp_path, DATABASE_FILE))


def _damage(path: Path, change: str, in_wal: bool) -> None:
    if in_wal:
        _beside_a_wal_of(path, change)
        return
    with sqlite3.connect(path) as conn:
        conn.executescript(change)
    conn.close()


@pytest.mark.parametrize("in_wal", [False, True], ids=["in the file", "in the WAL"])
def test_a_database_from_a_newer_version_is_refused(tmp_path: Path, in_wal: bool) -> None:
    SQLiteStore.open(tmp_path).close_sync()
    _damage(tmp_path / DATABASE_FILE, "PRAGMA user_version = 99", in_wal)
    assert "newer version" in str(_refused(tmp_path, DATABASE_FILE))


async def test_only_a_service_migrates_and_one_migrated_under_is_not_ready(
    tmp_path: Path,
) -> None:
    """A newer version's task (export, backup, import) migrated the database under the previous
    version's service, whose tag listings and writes then failed while it answered ready. A
    task now refuses an older schema and changes nothing; a service whose database was
    migrated since it started is not ready."""
    serving = SQLiteStore.open(tmp_path)
    try:
        with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:  # as the previous version left it
            conn.execute(f"PRAGMA user_version = {len(sqlite_store.MIGRATIONS) - 1}")
        conn.close()
        files = [tmp_path / DATABASE_FILE, tmp_path / f"{DATABASE_FILE}-wal"]
        before = [path.read_bytes() for path in files]  # -shm, an index of the WAL, may change
        with pytest.raises(StoreUnavailable, match="stop the service using it"):
            SQLiteStore.open(tmp_path, migrate=False)
        assert [path.read_bytes() for path in files] == before
        with pytest.raises(StoreUnavailable, match="migrated to schema"):
            await serving.check()
    finally:
        await serving.close()


_HOLD_OPEN = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM documents").fetchone()
print("open", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _open_in_another_process(path: Path) -> Iterator[None]:
    """The database at `path` held open by another process (until its stdin closes)."""
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OPEN, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline() == b"open\n"
        yield
    finally:
        other.communicate()


async def test_a_start_migrates_nothing_while_another_process_has_the_database_open(
    tmp_path: Path,
) -> None:
    """The previous version's service, still running, goes on writing by its schema's rules
    (words found by its own, which the new schema's index had left unfound, its removals failed
    as SQL errors): a start that would migrate under it is refused in one line, and changes
    nothing, until every other process is stopped."""
    store = SQLiteStore.open(tmp_path)
    doc, _ = await store.create(body("kept"))
    await store.close()
    path = tmp_path / DATABASE_FILE
    with sqlite3.connect(path) as conn:  # as the previous version left it
        conn.executescript(CONTENTLESS_WORDS + "PRAGMA user_version = 3;")
        conn.execute("INSERT INTO words (rowid, terms) SELECT n, 'kept' FROM documents")
    conn.close()
    with _open_in_another_process(path):
        before = [p.read_bytes() for p in (path, path.with_name(f"{DATABASE_FILE}-wal"))]
        with pytest.raises(StoreUnavailable, match="has schema 3 and another process has it open"):
            SQLiteStore.open(tmp_path).close_sync()
        assert [p.read_bytes() for p in (path, path.with_name(f"{DATABASE_FILE}-wal"))] == before
    store = SQLiteStore.open(tmp_path)
    try:
        assert await walk(store, 5, q="kept") == [doc.id]
    finally:
        await store.close()


async def test_a_restored_backup_another_process_holds_open_is_not_adopted(
    tmp_path: Path,
) -> None:
    """A backup is marked as one until its first start, which sets the WAL beside it aside: a
    start that could not write that through to the file (another process had it open, whose
    close would not checkpoint) would leave the mark, and the next start would set aside a WAL
    that holds writes. It is refused instead; once the other process is gone, it starts."""
    live = SQLiteStore.open(tmp_path / "live")
    doc, _ = await live.create(body("kept"))
    live.backup(tmp_path / "backup.db")
    await live.close()
    restored = tmp_path / "restored"
    restored.mkdir()
    (tmp_path / "backup.db").rename(restored / DATABASE_FILE)
    other = sqlite3.connect(restored / DATABASE_FILE)
    try:
        assert other.execute("SELECT count(*) FROM documents").fetchone() == (1,)
        with pytest.raises(StoreUnavailable, match="open in another process"):
            SQLiteStore.open(restored)
    finally:
        other.close()
    store = SQLiteStore.open(restored)
    assert await store.get(doc.id) == doc
    await store.close()


async def test_readiness_fails_while_writes_fail_and_recovers_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program holding the write lock (an operator's `sqlite3` shell inside a
    transaction), or an I/O error, failed every write while readiness said ready: it checked
    the directory and the free space only."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 50)
    store = SQLiteStore.open(tmp_path)
    try:
        await store.check()
        shell = sqlite3.connect(tmp_path / DATABASE_FILE, isolation_level=None)
        shell.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.check()  # before any client's write has failed
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.create(DocumentCreate(title="t", content="c"))
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.check()
        shell.execute("ROLLBACK")
        shell.close()
        wal = tmp_path / f"{DATABASE_FILE}-wal"
        size = wal.stat().st_size
        await store.check()
        # A real write, which the disk must take: a row rewritten as it was writes no page,
        # and readiness had said ready while every write failed on an I/O error.
        assert wal.stat().st_size > size
        await store.create(DocumentCreate(title="t", content="c"))
    finally:
        await store.close()


_OPEN_AND_CLOSE = """
import fcntl, os, sqlite3, sys
for n in range(int(sys.argv[2])):
    lock = os.open(sys.argv[1], os.O_RDONLY)  # the data directory's start lock, as a start takes it
    fcntl.flock(lock, fcntl.LOCK_EX)
    conn = sqlite3.connect(os.path.join(sys.argv[1], "documents.db"), isolation_level=None)
    conn.execute("UPDATE meta SET value = randomblob(32) WHERE name = 'unused'")
    os.close(lock)
    conn.close()  # the last user: its files go one at a time
"""


def test_a_start_is_not_refused_while_the_last_other_user_closes_the_database(
    tmp_path: Path,
) -> None:
    """A process closing the database as its last user drops its lock on the shared memory
    before its lock on the database: a start checking in between was refused as though the
    files had been taken away, for a few milliseconds at each stop of the service."""
    SQLiteStore.open(tmp_path).close_sync()
    other = subprocess.Popen([sys.executable, "-c", _OPEN_AND_CLOSE, str(tmp_path), "300"])
    try:
        checks = 0
        while other.poll() is None:
            with start_lock(tmp_path):
                check_sharers(tmp_path / DATABASE_FILE)
            checks += 1
        assert other.returncode == 0
        assert checks > 10
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("removed", [("", "-wal", "-shm"), ("-wal", "-shm"), ("-wal",), ("-shm",)])
async def test_a_database_replaced_under_the_store_is_written_no_more(
    tmp_path: Path, removed: tuple[str, ...]
) -> None:
    """A restore done while the service ran (its files removed, a backup copied in their
    place), or its WAL or shared memory removed: it went on answering 201 with writes to
    removed files, which no start reads; and a write it answered 503 was kept."""
    store = SQLiteStore.open(tmp_path)
    try:
        await store.create(DocumentCreate(title="t", content="c"))
        store.backup(tmp_path / "backup.db")
        for name in removed:
            (tmp_path / f"{DATABASE_FILE}{name}").unlink()
        if "" in removed:
            (tmp_path / DATABASE_FILE).write_bytes((tmp_path / "backup.db").read_bytes())
        with pytest.raises(StoreUnavailable, match="replaced or removed"):
            await store.create(DocumentCreate(title="lost", content="c"))
        with pytest.raises(StoreUnavailable, match="replaced or removed"):
            await store.check()
    finally:
        await store.close()
    store = SQLiteStore.open(tmp_path)
    try:
        items, _ = await store.page(DocumentQuery(), limit=10)
        assert [doc.title for doc in items] == ["t"]
    finally:
        await store.close()


async def test_the_database_and_its_backups_are_readable_by_their_owner_only(
    tmp_path: Path,
) -> None:
    """As the previous version's files were: they were made readable by every local user."""
    store = SQLiteStore.open(tmp_path / "data")
    try:
        await store.create(DocumentCreate(title="t", content="c"))
        store.backup(tmp_path / "backup.db")
        made = [tmp_path / "backup.db", *(tmp_path / "data").glob(f"{DATABASE_FILE}*")]
        assert len(made) == 4  # with the WAL and the shared memory
        assert {path.stat().st_mode & 0o777 for path in made} == {0o600}
    finally:
        await store.close()


def _legacy(data_dir: Path, docs: list[Document], keys: list[dict[str, Any]]) -> bytes:
    raw = orjson.dumps(
        {
            "documents": {str(n): d.model_dump(mode="json") for n, d in enumerate(docs, 1)},
            "idempotency": {str(n): k for n, k in enumerate(keys, 1)},
        }
    )
    (data_dir / LEGACY_FILE).write_bytes(raw)
    return raw


async def test_the_previous_versions_file_is_imported_once_and_kept_aside(
    tmp_path: Path, clock: FakeClock
) -> None:
    docs = [imported(n, tags=["t"], metadata={"n": n}) for n in range(3)]
    docs[1] = docs[1].model_copy(update={"version": 4, "updated_at": clock.now})
    at = clock.now.isoformat()
    keys = [
        {
            "scope": "alice",
            "key": "k",
            "fingerprint": "f",
            "document_id": docs[0].id,
            "created_at": at,
        },
        {
            "scope": "alice",
            "key": "old",
            "fingerprint": "f",
            "document_id": docs[2].id,
            "created_at": (clock.now - timedelta(days=2)).isoformat(),
        },
    ]
    raw = _legacy(tmp_path, docs, keys)
    for _ in range(2):
        store = SQLiteStore.open(tmp_path, clock=clock)
        assert await exported(store) == docs
        assert await walk(store, 5, tag=["t"], **{"metadata.n": "1"}) == [docs[1].id]
        await store.close()
    assert not (tmp_path / LEGACY_FILE).exists()
    assert (tmp_path / (LEGACY_FILE + ".imported")).read_bytes() == raw
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        assert conn.execute("SELECT key FROM idempotency").fetchall() == [("k",)]
    conn.close()


async def test_an_upgrade_keeps_the_file_an_earlier_upgrade_set_aside(tmp_path: Path) -> None:
    """A database made again from another copy of the previous version's file: its import had
    renamed that copy over the file the first upgrade had set aside."""
    first = _legacy(tmp_path, [imported(1)], [])
    SQLiteStore.open(tmp_path).close_sync()
    for path in tmp_path.glob(f"{DATABASE_FILE}*"):
        path.unlink()
    second = _legacy(tmp_path, [imported(2)], [])
    store = SQLiteStore.open(tmp_path)
    try:
        assert [doc.id for doc in await exported(store)] == [imported(2).id]
    finally:
        await store.close()
    kept = sorted(tmp_path.glob(f"{LEGACY_FILE}.imported*"))
    assert [path.read_bytes() for path in kept] == [first, second]
    assert not (tmp_path / LEGACY_FILE).exists()


async def test_a_key_carried_over_from_the_previous_version_replays_its_body_sent_again(
    tmp_path: Path, clock: FakeClock
) -> None:
    """That version's fingerprint hashed the metadata in the order sent: each identical retry
    of a key it had answered got 409, and the client whose answer was lost never learned the
    document's id. The fingerprint is the one that version computed for this body."""
    sent = '{"title": "t", "content": "c", "metadata": {"n": 0, "f": 1.5, "a": true, "s": "x"}}'
    data = DocumentCreate.model_validate_json(sent)
    doc = imported(1, metadata=data.metadata)
    printed = "9a8576bdd00e0be630a5f7b807d28db66c15ba1412114e0c162504668b6567cf"
    key = {"scope": "alice", "key": "k", "fingerprint": printed, "document_id": doc.id}
    _legacy(tmp_path, [doc], [{**key, "created_at": clock.now.isoformat()}])
    store = SQLiteStore.open(tmp_path, clock=clock)
    try:
        again = IdempotencyKey("alice", "k")
        assert await store.create(data, idempotency=again) == (doc, True)
        other = data.model_copy(update={"title": "other"})
        with pytest.raises(IdempotencyConflict):
            await store.create(other, idempotency=again)
    finally:
        await store.close()


def test_a_journal_left_by_a_killed_previous_version_is_refused(tmp_path: Path) -> None:
    _legacy(tmp_path, [imported(1)], [])
    (tmp_path / LEGACY_JOURNAL).write_bytes(b'0badc0de {"table": "documents"}\n')
    assert "start the previous version once" in str(_refused(tmp_path, LEGACY_JOURNAL))
    assert not (tmp_path / DATABASE_FILE).exists()


def test_the_previous_file_is_not_carried_over_while_the_previous_version_serves(
    tmp_path: Path,
) -> None:
    """That version holds its lock on documents.lock for as long as it serves, and writes
    documents.json again as it stops: imported meanwhile, its later writes were lost."""
    raw = _legacy(tmp_path, [imported(1)], [])
    (tmp_path / LEGACY_LOCK).touch()
    held = os.open(tmp_path / LEGACY_LOCK, os.O_RDONLY)  # as the previous version holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreUnavailable, match="previous version is serving"):
            SQLiteStore.open(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LEGACY_FILE, LEGACY_LOCK]
    finally:
        os.close(held)  # it stopped
    SQLiteStore.open(tmp_path).close_sync()
    assert (tmp_path / (LEGACY_FILE + ".imported")).read_bytes() == raw


def test_the_previous_version_and_this_one_never_serve_one_directory_together(
    tmp_path: Path,
) -> None:
    """With its changes still in its journal, that version leaves no documents.json: each had
    started beside the other, acknowledging writes the other never saw."""
    (tmp_path / LEGACY_LOCK).touch()  # it ran here once
    store = SQLiteStore.open(tmp_path)
    previous = os.open(tmp_path / LEGACY_LOCK, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # it cannot start: it takes the lock exclusively
            fcntl.flock(previous, fcntl.LOCK_EX | fcntl.LOCK_NB)
        store.close_sync()
        fcntl.flock(previous, fcntl.LOCK_EX | fcntl.LOCK_NB)  # now it serves
        with pytest.raises(StoreUnavailable, match="previous version is serving"):
            SQLiteStore.open(tmp_path)
    finally:
        os.close(previous)


def test_a_task_never_carries_the_previous_file_over(tmp_path: Path) -> None:
    """Only a service does: a task may run while the previous version still serves."""
    _legacy(tmp_path, [imported(1)], [])
    with pytest.raises(StoreUnavailable, match="start this version's service"):
        SQLiteStore.open(tmp_path, migrate=False)
    assert [p.name for p in tmp_path.iterdir()] == [LEGACY_FILE]


@pytest.mark.parametrize("left", [LEGACY_FILE, LEGACY_JOURNAL])
def test_a_previous_file_written_after_the_upgrade_is_refused_not_ignored(
    tmp_path: Path, left: str
) -> None:
    """The previous version run again after the upgrade writes a documents.json of its own as
    it stops, or leaves its writes in its journal when killed: in no database this version
    reads, and left unsaid."""
    _legacy(tmp_path, [imported(1)], [])
    SQLiteStore.open(tmp_path).close_sync()
    if left == LEGACY_FILE:  # with a document written since
        _legacy(tmp_path, [imported(1), imported(2)], [])
    else:
        (tmp_path / left).write_bytes(b'0badc0de {"table": "x"}\n')
    assert "beside this store's database" in str(_refused(tmp_path, left))


async def test_a_start_killed_before_it_set_the_imported_file_aside_is_finished(
    tmp_path: Path,
) -> None:
    """The first start commits the import, then renames documents.json aside: killed between
    the two, every later start was refused, saying the file held writes made since."""
    raw = _legacy(tmp_path, [imported(1)], [])
    SQLiteStore.open(tmp_path).close_sync()
    (tmp_path / f"{LEGACY_FILE}.imported").rename(tmp_path / LEGACY_FILE)  # as the kill left it
    store = SQLiteStore.open(tmp_path)
    try:
        assert await walk(store, 5) == [imported(1).id]
    finally:
        await store.close()
    assert not (tmp_path / LEGACY_FILE).exists()
    assert (tmp_path / f"{LEGACY_FILE}.imported").read_bytes() == raw


def test_a_previous_file_with_two_records_of_one_id_is_refused(tmp_path: Path) -> None:
    _legacy(tmp_path, [imported(1), imported(1)], [])
    assert "two records" in str(_refused(tmp_path, LEGACY_FILE))


def test_a_previous_file_with_a_time_past_the_calendar_in_utc_is_refused(tmp_path: Path) -> None:
    record = {**imported(1).model_dump(mode="json"), "created_at": "0001-01-01T00:00:00+01:00"}
    (tmp_path / LEGACY_FILE).write_bytes(
        orjson.dumps({"documents": {"1": record}})
    )  # year 0 in UTC
    assert "outside the years 1 to 9999" in str(_refused(tmp_path, LEGACY_FILE))
    assert not (tmp_path / DATABASE_FILE).exists()


@pytest.mark.parametrize(
    "change",
    [
        {"tags": ["  UPPER "]},
        {"tags": ["x" * 51]},
        {"title": "\u0000\n"},
        {"metadata": {"n": 2**80}},
        dict.fromkeys(["created_at", "updated_at"], "2025-01-01T05:00:00.123456+05:00"),
        dict.fromkeys(["created_at", "updated_at"], "2025-01-01T05:00:00.123+05:00"),
        {"metadata": {"n": -(2**63) - 1}},
        {"metadata": {"ratio": 1e20}},
    ],
    ids=[
        "a tag not in its stored form",
        "a tag too long",
        "a control character",
        "a number past 64 bits",
        "a time not in UTC milliseconds",
        "a time not in UTC",
        "a number just past 64 bits",
        "a float past 64 bits (the previous version took any)",
    ],
)
def test_a_previous_file_with_a_document_the_api_would_not_store_is_refused(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """Carried over as written, such a document was served as it was (a number past 64 bits
    changed to a float), and what `export` wrote of it `import` refused."""
    record = {**imported(1).model_dump(mode="json"), **change}
    (tmp_path / LEGACY_FILE).write_text(json.dumps({"documents": {"1": record}}))  # any number
    refused = str(_refused(tmp_path, LEGACY_FILE))
    assert record["id"] in refused
    assert not (tmp_path / DATABASE_FILE).exists()


def test_a_previous_file_with_two_records_of_one_idempotency_key_is_refused(
    tmp_path: Path,
) -> None:
    record = {"scope": "a", "key": "k", "fingerprint": "f", "document_id": "d"}
    at = datetime.now(UTC).isoformat()  # unexpired
    _legacy(tmp_path, [imported(1)], [{**record, "created_at": at}] * 2)
    assert "two records" in str(_refused(tmp_path, LEGACY_FILE))
    assert not (tmp_path / DATABASE_FILE).exists()


def test_a_previous_files_documents_of_one_millisecond_are_imported_in_any_order(
    tmp_path: Path,
) -> None:
    """Newest id first, as the previous version's file may hold them: the store had room for a
    dozen of one millisecond in that order, and the import sorted them first."""
    ids = IdGenerator()
    docs = [imported(0).model_copy(update={"id": ids(imported(0).created_at)}) for _ in range(200)]
    _legacy(tmp_path, docs[::-1], [])
    SQLiteStore.open(tmp_path).close_sync()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (200,)
    conn.close()


def test_stores_opened_at_once_migrate_and_import_the_previous_file_once(tmp_path: Path) -> None:
    docs = [imported(n) for n in range(200)]
    _legacy(tmp_path, docs, [])
    opened: list[SQLiteStore] = []

    def open_store() -> None:
        opened.append(SQLiteStore.open(tmp_path))

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 4
    for store in opened:
        store.close_sync()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (200,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
