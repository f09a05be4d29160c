"""The DocumentStore contract, and what the TinyDB store promises about its files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from tinydb import TinyDB

from models import Document, DocumentCreate, DocumentQuery, DocumentUpdate
from mongo_store import MongoStore
from storage import (
    DATA_FILE,
    JOURNAL_FILE,
    DocumentInvalid,
    DocumentNotFound,
    DocumentStore,
    IdempotencyConflict,
    IdempotencyKey,
    PreconditionFailed,
    StoreCorrupt,
    StoreLocked,
    StoreUnavailable,
    TinyDBStore,
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


@pytest.fixture(params=["tinydb", "mongodb"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[DocumentStore]:
    """The contract is one suite, run against each backend."""
    opened: DocumentStore
    if request.param == "tinydb":
        opened = TinyDBStore.open(tmp_path, clock=clock)
    else:
        opened = await MongoStore.open(request.getfixturevalue("mongo_url"), clock=clock)
    yield opened
    await opened.close()


def body(title: str = "t", tags: list[str] | None = None, **extra: object) -> DocumentCreate:
    return DocumentCreate.model_validate(
        {"title": title, "content": "c", "tags": tags or [], **extra}
    )


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
    assert await store.import_document(doc)
    assert not await store.import_document(doc.model_copy(update={"title": "other"}))
    assert await store.get(doc.id) == doc
    assert await exported(store) == [doc]


# --- the TinyDB store's files -----------------------------------------------------------------


async def test_reopen_keeps_everything_and_tinydb_reads_the_file(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    doc, _ = await store.create(body("kept", ["t"]))
    await store.close()
    assert (tmp_path / JOURNAL_FILE).stat().st_size == 0
    with TinyDB(tmp_path / DATA_FILE) as db:
        assert db.table("documents").all()[0]["title"] == "kept"
    reopened = TinyDBStore.open(tmp_path)
    assert await reopened.get(doc.id) == doc
    await reopened.close()


async def test_journal_is_replayed_when_the_process_did_not_close(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    doc, _ = await store.create(body("journalled"))
    gone, _ = await store.create(body("deleted"))
    await store.delete(gone.id)
    store._release()  # what a crash leaves: a journal not yet folded into the file
    assert (tmp_path / JOURNAL_FILE).stat().st_size > 0
    reopened = TinyDBStore.open(tmp_path)
    assert [d.id for d in await exported(reopened)] == [doc.id]
    await reopened.close()


async def test_torn_last_journal_line_is_dropped(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    doc, _ = await store.create(body("acknowledged"))
    store._release()
    with open(tmp_path / JOURNAL_FILE, "ab") as fh:
        fh.write(b'0badc0de {"table": "documents", "id": "half-writ')
    reopened = TinyDBStore.open(tmp_path)
    assert [d.id for d in await exported(reopened)] == [doc.id]
    await reopened.close()


async def test_damaged_journal_line_is_refused_as_corrupt(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    await store.create(body("one"))
    await store.create(body("two"))
    store._release()
    journal = tmp_path / JOURNAL_FILE
    damaged = journal.read_bytes().replace(b"one", b"0ne", 1)
    journal.write_bytes(damaged)
    with pytest.raises(StoreCorrupt, match="corrupt"):
        TinyDBStore.open(tmp_path)
    assert journal.read_bytes() == damaged


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"documents": [1]}', b"\x00garbage"])
def test_unparseable_data_file_is_refused_and_left_untouched(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / DATA_FILE).write_bytes(content)
    with pytest.raises(StoreCorrupt, match=f"corrupt.*|{tmp_path}") as caught:
        TinyDBStore.open(tmp_path)
    assert str(tmp_path / DATA_FILE) in str(caught.value)
    assert (tmp_path / DATA_FILE).read_bytes() == content


def test_invalid_document_in_data_file_is_refused(tmp_path: Path) -> None:
    content = b'{"documents": {"1": {"id": "x", "title": "no other fields"}}}'
    (tmp_path / DATA_FILE).write_bytes(content)
    with pytest.raises(StoreCorrupt):
        TinyDBStore.open(tmp_path)
    assert (tmp_path / DATA_FILE).read_bytes() == content


async def test_second_open_of_a_directory_raises_store_locked(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    with pytest.raises(StoreLocked, match=str(tmp_path)):
        TinyDBStore.open(tmp_path)
    await store.close()
    TinyDBStore.open(tmp_path).close_sync()


async def test_journal_is_compacted_into_the_file_while_running(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path, compact_min_bytes=2000)
    ids = [(await store.create(body(f"d{i}")))[0].id for i in range(20)]
    # Compaction ran: the TinyDB file alone already holds most documents, and stays readable.
    with TinyDB(tmp_path / DATA_FILE) as db:
        assert len(db.table("documents")) >= 10
    assert (tmp_path / JOURNAL_FILE).stat().st_size < 2000 + 500
    await store.close()
    reopened = TinyDBStore.open(tmp_path)
    assert [d.id for d in await exported(reopened)] == ids
    await reopened.close()


async def test_closed_store_raises_unavailable(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get("x")


async def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    store = TinyDBStore.open(tmp_path)
    created: list[str] = []

    async def writer(n: int) -> None:
        for i in range(40):
            doc, _ = await store.create(body(f"w{n}-{i}"))
            created.append(doc.id)

    async with anyio.create_task_group() as tasks:
        for n in range(8):
            tasks.start_soon(writer, n)
    await store.close()
    reopened = TinyDBStore.open(tmp_path)
    assert sorted(d.id for d in await exported(reopened)) == sorted(created)
    assert len(created) == 320
    await reopened.close()
