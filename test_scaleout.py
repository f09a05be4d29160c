"""Scale-out: the MongoDB backend through the API, outages, several workers, shared limits,
and moving data between backends. MongoDB is SecantusDB, a real wire-protocol server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import bson
import httpx
import pymongo
import pytest
import redis
from fastapi.testclient import TestClient
from pymongo import AsyncMongoClient
from secantus import SecantusDBServer

import models
import mongo_store
from conftest import (
    KEY,
    OP_MSG,
    OTHER_KEY,
    SPARSE,
    Fate,
    Service,
    ServiceFactory,
    TcpProxy,
    _read_message,
    app_client,
    assert_problem,
    cursor_values_out_of_range,
    free_port,
    make_settings,
    run_main,
    run_threads,
    seed_common,
    until_ready,
    walk,
)
from logging_config import configure_logging
from metrics import MeteredStore, Metrics
from models import Document, DocumentCreate, DocumentQuery, DocumentUpdate
from mongo_store import INDEXES, MongoStore
from ratelimit import TIMEOUT as LIMITER_TIMEOUT
from storage import (
    PAGE_MAX_BYTES,
    DocumentNotFound,
    IdempotencyConflict,
    IdempotencyKey,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)

DOC = {"title": "t", "content": "c", "tags": ["x"]}


@contextlib.contextmanager
def mongo_app_client(
    url: str, tmp_path: Path, *, reachable: bool = True, **overrides: Any
) -> Iterator[TestClient]:
    """The app on `url`, ready: on a loaded host the test server can take longer than the
    first-contact second to make the indexes, and the service then makes them in the
    background, answering 503 until they are."""
    settings: dict[str, Any] = {"mongo_timeout_ms": 500, **overrides}
    with app_client(tmp_path, headers={"X-API-Key": KEY}, database_url=url, **settings) as client:
        if reachable:
            until_ready(client)
        yield client


# --- the API on MongoDB -----------------------------------------------------------------------


def test_api_round_trip_on_mongodb(mongo_url: str, tmp_path: Path) -> None:
    with mongo_app_client(mongo_url, tmp_path, mongo_timeout_ms=5_000) as client:
        created = client.post("/v1/documents", json=DOC)
        assert created.status_code == 201
        doc = created.json()
        assert client.get(f"/v1/documents/{doc['id']}").json() == doc
        assert client.get("/v1/documents", params={"tag": "x"}).json()["items"] == [doc]
        stale = client.patch(
            f"/v1/documents/{doc['id']}", json={"title": "u"}, headers={"If-Match": '"0"'}
        )
        assert stale.status_code == 412
        patched = client.patch(
            f"/v1/documents/{doc['id']}", json={"title": "u"}, headers={"If-Match": '"1"'}
        )
        assert patched.json()["version"] == 2
        assert client.delete(f"/v1/documents/{doc['id']}").status_code == 204
        assert client.get(f"/v1/documents/{doc['id']}").status_code == 404
        ready = client.get("/health/ready").json()
        assert ready["backend"] == "mongodb"
    assert not list(tmp_path.iterdir()), "the MongoDB backend must not touch DATA_DIR"


def test_metadata_keys_that_bson_forbids_round_trip(mongo_url: str, tmp_path: Path) -> None:
    metadata = {"a.b": 1, "$where": "x", "nul\x00key": True, "big": 2**63 - 1}
    with mongo_app_client(mongo_url, tmp_path) as client:
        doc = client.post("/v1/documents", json={**DOC, "metadata": metadata}).json()
        assert client.get(f"/v1/documents/{doc['id']}").json()["metadata"] == metadata


def test_documents_from_before_the_word_index_get_their_words_and_are_found(
    mongo_url: str,
) -> None:
    async def upgrade() -> tuple[list[str], int, dict[str, list[str]]]:
        store = await MongoStore.open(mongo_url, serving=False)
        assert store.words_added is not None
        await store.words_added  # the rules recorded: the next start looks for missing words
        docs = []
        for title, content in [(f"Crème brûlée {i}", "Old recipe") for i in range(3)] + [
            ("Crème fraîche", "New")
        ]:
            doc, _ = await store.create(DocumentCreate(title=title, content=content))
            docs.append(doc)
        await store.close()
        await _as_an_earlier_version_left(mongo_url, {"_id": {"$in": [d.id for d in docs[:3]]}})
        added, found = await _after_the_words_pass(mongo_url, "creme", "recipe")
        return [doc.id for doc in reversed(docs)], added, found

    newest_first, added, found = anyio.run(upgrade)
    assert added == 3
    assert found == {"creme": newest_first, "recipe": newest_first[1:]}


def test_words_other_rules_found_are_found_again_by_this_version_s(mongo_url: str) -> None:
    """An upgrade whose rules find other words in some texts (another version's, another
    Python's Unicode): the first start by them finds every document's words again, and `q`
    finds what each text says, no longer the words the old rules found."""

    async def upgrade() -> tuple[str, int, dict[str, list[str]]]:
        store = await MongoStore.open(mongo_url, serving=False)
        doc, _ = await store.create(DocumentCreate(title="Crème", content="brûlée"))
        await store.create(DocumentCreate(title="Kept", content="as its words were"))
        assert store.words_added is not None
        await store.words_added
        await store.close()
        await _as_other_rules_left(mongo_url, doc.id)
        added, found = await _after_the_words_pass(mongo_url, "creme", "me")
        return doc.id, added, found

    doc_id, added, found = anyio.run(upgrade)
    assert found == {"creme": [doc_id], "me": []}
    assert added == 1  # the other document's words were already those of the new rules


def test_a_document_retagged_during_the_words_pass_gets_the_words_of_its_text(
    mongo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit of tags or metadata finds no words: a document so edited between the pass's read
    and its write had been left to its writer, and kept the old rules' words for good."""
    pass_store: list[MongoStore] = []  # the store whose pass edits once, then goes on
    ids: list[str] = []
    words_of = mongo_store._words_of

    async def retagged_first(title: str, content: str) -> list[str]:
        if pass_store:  # the pass has read the document: an edit lands before its write
            await pass_store.pop().update(ids[0], DocumentUpdate(tags=["retagged"]))
        return await words_of(title, content)

    async def upgrade() -> list[tuple[str, list[str]]]:
        store = await MongoStore.open(mongo_url, serving=False)
        doc, _ = await store.create(DocumentCreate(title="Crème", content="brûlée"))
        ids.append(doc.id)
        assert store.words_added is not None
        await store.words_added
        await store.close()
        await _as_other_rules_left(mongo_url, doc.id)
        monkeypatch.setattr(mongo_store, "_words_of", retagged_first)
        store = await MongoStore.open(mongo_url, serving=False)
        pass_store.append(store)
        assert store.words_added is not None
        await store.words_added
        found = []
        for q in ("creme", "me"):
            items, _ = await store.page(DocumentQuery.model_validate({"q": q}), limit=10)
            found += [(q, d.tags) for d in items]
        await store.close()
        return found

    assert anyio.run(upgrade) == [("creme", ["retagged"])]
    assert not pass_store  # the edit happened


async def _as_other_rules_left(url: str, doc_id: str) -> None:
    """Words of this document by other rules (`Crème` taken for two), `meta` naming those."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    db = client.get_default_database()
    await db["documents"].update_one({"_id": doc_id}, {"$set": {"words": ["cr", "me"]}})
    other = {"$set": {"value": "1 unicode 9"}}
    await db["meta"].update_one({"_id": "words_rules"}, other, upsert=True)
    await client.close()


async def _after_the_words_pass(url: str, *words: str) -> tuple[int, dict[str, list[str]]]:
    """A start's words pass: the documents it wrote words to, and the ids each word finds."""
    store = await MongoStore.open(url, serving=False)
    try:
        assert store.words_added is not None
        added = await store.words_added
        found = {}
        for q in words:
            items, _ = await store.page(DocumentQuery.model_validate({"q": q}), limit=10)
            found[q] = [doc.id for doc in items]
        return added, found
    finally:
        await store.close()


async def _as_an_earlier_version_left(url: str, which: dict[str, Any]) -> None:
    """Take the `words` off these documents, as an earlier version wrote them."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    await client.get_default_database()["documents"].update_many(which, {"$unset": {"words": ""}})
    await client.close()


def _cjk_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(chr(0x4E00 + rng.randrange(20_000)) * 2 for _ in range(words))


def test_a_large_documents_words_are_found_off_the_event_loop_and_only_when_its_text_changes(
    mongo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing a long text takes milliseconds that every other request would wait out on the
    event loop; a tag or metadata edit needs no words at all."""
    tokenized: list[tuple[int, int]] = []  # (characters, thread)
    tokenize = models.document_words

    def recorded(title: str, content: str) -> set[str]:
        tokenized.append((len(content), threading.get_ident()))
        return tokenize(title, content)

    monkeypatch.setattr(mongo_store, "document_words", recorded)

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        store = await MongoStore.open(mongo_url, serving=False)
        big, _ = await store.create(DocumentCreate(title="big", content=_cjk_text(5_000)))
        await store.create(DocumentCreate(title="small", content="a few words"))
        await store.update(big.id, DocumentUpdate(tags=["edited"], metadata={"k": 1}))
        await store.update(big.id, DocumentUpdate(content=_cjk_text(5_000, seed=1)))
        for q in ("big", "a few"):
            found, _ = await store.page(DocumentQuery.model_validate({"q": q}), limit=1)
            assert len(found) == 1
        changed = await store.get(big.id)
        assert changed.content == _cjk_text(5_000, seed=1)
        found, _ = await store.page(
            DocumentQuery.model_validate({"q": changed.content[:2]}), limit=1
        )
        assert [d.id for d in found] == [big.id]
        await store.close()
        big_size = len(_cjk_text(5_000))
        assert [size for size, _ in tokenized] == [big_size, len("a few words"), big_size]
        assert [thread == loop_thread for _, thread in tokenized] == [False, True, False]

    anyio.run(scenario)


FINDING = [
    ({}, "created"),
    ({"sort": "created_at", "created_before": "2100-01-01T00:00:00Z"}, "created"),
    ({"sort": "-updated_at"}, "updated"),
    ({"updated_after": "2000-01-01T00:00:00Z", "sort": "updated_at"}, "updated"),
    ({"q": "crème report"}, "words_created"),
    ({"q": "report", "tag": ["t"], "sort": "-updated_at"}, "words_created"),
    ({"tag": ["t", "u"]}, "tags_created"),
    ({"metadata.n": "1"}, "metadata_created"),
    ({"metadata.n": "1", "sort": "-updated_at"}, "updated"),
]


def test_every_listing_is_served_by_a_named_index_never_a_collection_scan(mongo_url: str) -> None:
    async def plans() -> tuple[list[dict[str, Any]], list[str]]:
        store = await MongoStore.open(mongo_url, serving=False)
        for i in range(5):
            body = {"title": f"Crème report {i}", "content": "c", "tags": ["t", "u"]}
            await store.create(DocumentCreate.model_validate({**body, "metadata": {"n": 1}}))
        found = []
        for params, _ in FINDING:
            query = DocumentQuery.model_validate(params)
            # The find a listing runs, on its second page: past a cursor.
            _, after = await store.page(query, limit=1)
            found.append((await store._find(query, 2, after).explain())["queryPlanner"])
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
        ttl = [
            ix["name"]
            async for ix in await client.get_default_database()["idempotency"].list_indexes()
            if "expireAfterSeconds" in ix and ix["expireAfterSeconds"] == 86400
        ]
        await client.close()
        await store.close()
        return found, ttl

    found, ttl = anyio.run(plans)

    def stages(plan: dict[str, Any]) -> list[dict[str, Any]]:
        return [plan, *stages(plan["inputStage"])] if "inputStage" in plan else [plan]

    for planner, (params, index) in zip(found, FINDING, strict=True):
        plan = stages(planner["winningPlan"])
        scans = [s for s in plan if s["stage"] in ("IXSCAN", "COLLSCAN")]
        assert [(s["stage"], s.get("indexName")) for s in scans] == [("IXSCAN", index)], params
    assert ttl == ["ttl_24h"]


@pytest.mark.parametrize("text", ["latin", "cjk"])
def test_a_listing_of_large_documents_reads_about_what_its_page_can_send(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path, text: str
) -> None:
    """limit=100 over documents of 100 000 characters (1 or 3 bytes each): the service reads
    from MongoDB, and decodes on its event loop, about the 1 MiB a page can send, not 100
    documents; the walk still returns every document once, newest first."""
    proxy, url = proxied_mongo
    proxy.start()
    content = ("lorem ipsum " * 8_334)[:100_000] if text == "latin" else _cjk_text(33_333)
    with mongo_app_client(url, tmp_path) as client:
        ids = [
            client.post("/v1/documents", json={"title": f"big {i}", "content": content}).json()[
                "id"
            ]
            for i in range(30)
        ]
        before = proxy.replied
        page = client.get("/v1/documents", params={"limit": 100}).json()
        read = proxy.replied - before
        assert page["next_cursor"] is not None
        assert read < 1.5 * PAGE_MAX_BYTES, read
        assert [doc["id"] for doc in walk(client, limit=100)] == ids[::-1]


def test_cursor_values_are_range_checked_on_mongodb(mongo_url: str, tmp_path: Path) -> None:
    with mongo_app_client(mongo_url, tmp_path) as client:
        cursor_values_out_of_range(client)


def test_every_process_sharing_the_database_signs_cursors_with_one_secret_made_once(
    mongo_url: str,
) -> None:
    async def secrets() -> list[bytes]:
        stores = [await MongoStore.open(mongo_url, serving=False) for _ in range(4)]
        made = await asyncio.gather(*(store.cursor_secret() for store in stores))
        for store in stores:
            await store.close()
        later = await MongoStore.open(mongo_url, serving=False)
        made.append(await later.cursor_secret())
        await later.close()
        return made

    made = anyio.run(secrets)
    assert len(made[0]) == 32
    assert set(made) == {made[0]}


# --- outages ----------------------------------------------------------------------------------


@pytest.fixture
def proxied_mongo(mongo_server: SecantusDBServer, mongo_url: str) -> Iterator[tuple[TcpProxy, str]]:
    proxy = TcpProxy(mongo_server.address)
    database = mongo_url.rsplit("/", 1)[1]
    yield proxy, f"mongodb://{proxy.address}/{database}?directConnection=true"
    proxy.stop()


def test_an_index_build_mongodb_refuses_is_retried_after_a_pause_not_by_every_request(
    proxied_mongo: tuple[TcpProxy, str], mongo_url: str, tmp_path: Path
) -> None:
    """MongoDB is down at the start, then back with an index the build cannot make (the same
    name, other options): requests get 500 then 503, and the build is not re-run by each."""
    proxy, url = proxied_mongo
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_url, directConnection=True
    )
    with client:
        client.get_default_database()["documents"].create_index(
            "deleted_at", expireAfterSeconds=60, name="tombstones"
        )
    builds: list[bytes] = []

    def count_builds(message: bytes) -> Fate:
        if b"createIndexes" in message:
            builds.append(message)
        return "deliver"

    proxy.fault = count_builds
    with mongo_app_client(url, tmp_path, reachable=False) as app:  # the build waits
        proxy.start()
        answers = [app.post("/v1/documents", json=DOC).status_code for _ in range(10)]
    assert set(answers) <= {500, 503}
    assert answers.count(503) >= 9
    assert len(builds) <= len(INDEXES) + 2  # one attempt, not one per request


def test_mongodb_down_at_startup_then_back(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    proxy, url = proxied_mongo
    with mongo_app_client(url, tmp_path, reachable=False) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == "application/problem+json"
        down = client.post("/v1/documents", json=DOC)
        assert down.status_code == 503
        assert "Traceback" not in down.text
        assert "pymongo" not in down.text.lower()
        proxy.start()
        until_ready(client)
        assert client.post("/v1/documents", json=DOC).status_code == 201


def test_after_a_start_without_mongodb_the_indexes_are_made_in_the_background_by_no_request(
    service_factory: ServiceFactory, mongo_server: SecantusDBServer, mongo_url: str
) -> None:
    """MongoDB is down at the start, then back: the service makes the indexes by itself, with no
    request at all. While the build is held on the wire, probes and requests answer 503 at once
    (none waits on it or runs one), and once it is done none sends another."""
    proxy = TcpProxy(mongo_server.address)
    database = mongo_url.rsplit("/", 1)[1]
    url = f"mongodb://{proxy.address}/{database}?directConnection=true"
    building, release = threading.Event(), threading.Event()
    commands: list[str] = []

    def hold_builds(message: bytes) -> Fate:
        commands.append(_command(message))
        if commands[-1] == "createIndexes":
            building.set()
            release.wait(30)
        return "deliver"

    proxy.fault = hold_builds
    service = service_factory(env={"DATABASE_URL": url, "MONGO_TIMEOUT_MS": "5000"})
    try:
        service.start()
        with service.client() as client:
            assert_problem(client.get("/health/ready"), 503)
            proxy.start()
            assert building.wait(30), "no index build without a request"
            for _ in range(3):
                for answer in (
                    client.get("/health/ready"),
                    client.post("/v1/documents", json=DOC),
                    client.get("/v1/documents"),
                    client.get(f"/v1/documents/{'0' * 26}"),
                ):
                    assert_problem(answer, 503)
                    assert answer.elapsed.total_seconds() < 1
            release.set()
            service.wait_for_line("store.indexes_made", timeout=30)
            commands.clear()
            assert client.get("/health/ready").status_code == 200
            assert client.post("/v1/documents", json=DOC).status_code == 201
            assert "createIndexes" not in commands
    finally:
        release.set()
        proxy.stop()
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_url, directConnection=True
    )
    with mongo:
        made = {ix["name"] for ix in mongo.get_default_database()["documents"].list_indexes()}
    assert made >= set(INDEXES)


@pytest.mark.parametrize("found_by", ["a probe", "a listing"])
def test_a_database_emptied_under_the_service_gets_its_indexes_again(
    mongo_url: str, found_by: str
) -> None:
    """MongoDB restarted without its volume, or its database dropped: every listing had got 500
    for good (its hint named an index gone with the data) while readiness said 200. The first
    probe or listing to meet the loss gets 503, the indexes are made again, and what is written
    after is served."""

    async def empty_it() -> list[str]:
        store = await MongoStore.open(mongo_url, serving=False)
        try:
            await store.create(DocumentCreate(title="before", content="c"))
            mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
            await mongo.drop_database(mongo.get_default_database().name)
            await mongo.close()
            if found_by == "a probe":
                with pytest.raises(StoreUnavailable, match="lost indexes"):
                    await store.check()
            else:
                await store.create(DocumentCreate(title="between", content="c"))
                with pytest.raises(StoreUnavailable, match="lost the store's indexes"):
                    await store.page(DocumentQuery(), limit=10)
            with pytest.raises(StoreUnavailable):  # until they are made again
                await store.page(DocumentQuery(tag=["t"]), limit=10)
            assert store.indexes_made is not None
            await store.indexes_made
            await store.check()
            await store.create(DocumentCreate(title="after", content="c", tags=["t"]))
            assert len(await store.cursor_secret()) == 32
            items, _ = await store.page(DocumentQuery(), limit=10)
            return [doc.title for doc in items]
        finally:
            await store.close()

    expected = ["after", "between"] if found_by == "a listing" else ["after"]
    assert anyio.run(empty_it) == expected


def test_every_process_signs_cursors_with_the_secret_made_after_mongodb_came_back_empty(
    mongo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers: the one that found the loss made a new cursor secret, the other kept the
    old one, and a cursor from either was refused by the other (400) for as long as they ran.
    Each reads the secret again every few seconds (here at each listing)."""
    monkeypatch.setattr(mongo_store, "SECRET_READ_EVERY_S", 0.0)

    async def secrets_of() -> tuple[bytes, bytes, bytes]:
        found = await MongoStore.open(mongo_url, serving=False)
        other = await MongoStore.open(mongo_url, serving=False)
        try:
            before = await found.cursor_secret()
            assert await other.cursor_secret() == before
            mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
            await mongo.drop_database(mongo.get_default_database().name)
            await mongo.close()
            with pytest.raises(StoreUnavailable, match="lost indexes"):
                await found.check()
            assert found.indexes_made is not None
            await found.indexes_made
            return before, await found.cursor_secret(), await other.cursor_secret()
        finally:
            await found.close()
            await other.close()

    before, after, others = anyio.run(secrets_of)
    assert after != before
    assert others == after


def test_indexes_made_in_the_background_start_one_pass_for_missing_words(
    proxied_mongo: tuple[TcpProxy, str],
) -> None:
    proxy, url = proxied_mongo

    async def first_contact() -> int:
        proxy.start()
        store = await MongoStore.open(url, serving=False)
        for i in range(200):
            await store.create(DocumentCreate(title=f"Old {i}", content="c"))
        await store.close()
        await _as_an_earlier_version_left(url, {})
        proxy.stop()
        store = await MongoStore.open(url)  # unreachable: the indexes are made later
        proxy.start()
        assert store.indexes_made is not None
        await store.indexes_made
        await asyncio.gather(*(store.page(DocumentQuery(), limit=1) for _ in range(8)))
        passes = [t for t in asyncio.all_tasks() if "_add_missing_words" in repr(t.get_coro())]
        await store.close()
        return len(passes)

    assert anyio.run(first_contact) == 1


def test_counting_without_mongodb_at_the_start_fails_at_once(
    proxied_mongo: tuple[TcpProxy, str],
) -> None:
    """The start's `service.started` line and each scrape count the documents: started without
    MongoDB, that count is refused before it waits on the driver (30 s here)."""
    _, url = proxied_mongo

    async def count() -> None:
        store = await MongoStore.open(url, timeout_ms=30_000)
        try:
            with anyio.fail_after(10), pytest.raises(StoreUnavailable, match="indexes"):
                await store.count()
        finally:
            await store.close()

    anyio.run(count)


def test_every_route_answers_503_at_once_while_the_indexes_are_not_made(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """Started without MongoDB: each call is refused before it waits on the driver, whose
    timeout here (30 s) the test would otherwise run into."""
    _, url = proxied_mongo
    with mongo_app_client(url, tmp_path, reachable=False, mongo_timeout_ms=30_000) as client:
        for method, path in (
            ("GET", "/v1/documents"),
            ("GET", "/v1/documents?q=word&tag=x"),
            ("GET", "/v1/documents/some-id"),
            ("POST", "/v1/documents"),
            ("PATCH", "/v1/documents/some-id"),
            ("DELETE", "/v1/documents/some-id"),
            ("GET", "/health/ready"),
        ):
            started = time.monotonic()
            body = DOC if method in ("POST", "PATCH") else None
            assert_problem(client.request(method, path, json=body), 503)
            assert time.monotonic() - started < 10, (method, path)  # the driver's is 30


def test_mongodb_lost_mid_run_then_recovers(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path) as client:
        doc = client.post("/v1/documents", json=DOC).json()
        proxy.stop()
        assert client.get(f"/v1/documents/{doc['id']}").status_code == 503
        assert client.get("/v1/documents").status_code == 503
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health").status_code == 200
        proxy.start()
        until_ready(client)
        assert client.get(f"/v1/documents/{doc['id']}").json() == doc


# --- what probes, scrapes and a struggling server cost -----------------------------------------


def _recording(proxy: TcpProxy) -> list[dict[str, Any]]:
    """Every command the relay passes on, decoded, in order."""
    seen: list[dict[str, Any]] = []

    def record(message: bytes) -> Fate:
        if _command(message):
            seen.append(bson.decode(message[21 : 21 + int.from_bytes(message[21:25], "little")]))
        return "deliver"

    proxy.fault = record
    return seen


WRITES = {"insert", "update", "delete", "findAndModify"}


def test_probes_and_scrapes_read_no_documents_and_write_nothing(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """A probe or a scrape costs the same at any size: no count over the documents (an
    aggregate; the estimate is taken at most every few seconds), and readiness writes
    nothing."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path) as client:
        for _ in range(3):
            assert client.post("/v1/documents", json=DOC).status_code == 201
        seen = _recording(proxy)
        for _ in range(3):
            ready = client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["documents"] == 3
            assert client.get("/metrics").status_code == 200
    commands = [next(iter(command)) for command in seen]
    assert commands.count("count") <= 1
    assert set(commands).isdisjoint({"aggregate", *WRITES}), commands
    # Readiness reads one record by _id, of the meta collection: never a document.
    assert {(c["find"], str(c["filter"])) for c in seen if "find" in c} <= {
        ("meta", "{'_id': 'cursor_secret'}")
    }


def test_a_read_mongodb_stops_at_its_time_limit_is_charged_its_time(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """MongoDB works on a listing until its maxTimeMS and stops it (503); failing, it was
    charged nothing, so reads made to fail cost their key less than answered ones."""
    proxy, url = proxied_mongo
    proxy.start()

    def worked_then_stopped(message: bytes) -> Fate:
        if _command(message) == "find" and b"common" in message:
            time.sleep(0.3)  # the server at work
            return "time limit"
        return "deliver"

    with mongo_app_client(url, tmp_path, rate_limit="1000/minute") as client:
        proxy.fault = worked_then_stopped
        stopped = client.get("/v1/documents", params=SPARSE)
        assert_problem(stopped, 503)
        next_one = client.get("/v1/documents/nothing-here")
        spent = int(stopped.headers["x-ratelimit-remaining"]) - int(
            next_one.headers["x-ratelimit-remaining"]
        )
        assert spent > 10  # the next request's unit, and the stopped read's 300 ms


def test_a_mongodb_that_hangs_is_not_charged_to_the_keys_that_waited_on_it(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """MongoDB accepts and never answers: each read waits MONGO_TIMEOUT_MS and gets 503, but the
    wait is the outage's, not the key's; once MongoDB answers the key has its budget."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path, rate_limit="100/minute", mongo_timeout_ms=1_000) as client:
        doc = client.post("/v1/documents", json=DOC).json()
        proxy.black_hole = True
        for _ in range(3):  # 3 s of waiting: 300 units, were it charged
            assert_problem(client.get(f"/v1/documents/{doc['id']}"), 503)
        proxy.black_hole = False
        proxy.stop()  # cut the connections that hold swallowed requests
        proxy.start()
        until_ready(client)
        served = client.get(f"/v1/documents/{doc['id']}")
        assert served.status_code == 200
        assert int(served.headers["x-ratelimit-remaining"]) > 80


def test_a_delete_that_meets_a_hung_mongodb_sends_its_write_once_per_time_limit(
    proxied_mongo: tuple[TcpProxy, str],
) -> None:
    """A delete sends its write again when a reply does not come (a reply lost, not the write):
    after a hang, the second write had waited a whole MONGO_TIMEOUT_MS more, and the 503 came
    after twice the limit. It now gets what the first left of one limit: nothing, so it is
    never sent."""
    proxy, url = proxied_mongo
    held: list[bytes] = []

    def hold_writes(message: bytes) -> Fate:
        if _command(message) == "update":
            held.append(message)
            time.sleep(1.5)  # past the limit: the reply comes too late
        return "deliver"

    async def delete() -> None:
        proxy.start()
        store = await MongoStore.open(url, timeout_ms=1000, serving=False)
        try:
            doc, _ = await store.create(DocumentCreate(title="t", content="c"))
            assert store.words_added is not None
            await store.words_added  # its writes are not the delete's
            proxy.fault = hold_writes
            with pytest.raises(StoreUnavailable):
                await store.delete(doc.id)
        finally:
            proxy.fault = None
            await store.close()

    anyio.run(delete)
    assert len(held) == 1


def test_edits_of_a_document_queued_behind_one_a_hung_mongodb_fails_fail_with_it(
    proxied_mongo: tuple[TcpProxy, str],
) -> None:
    """A process edits a document one edit at a time (MeteredStore): behind a hung MongoDB each
    queued edit had waited out a time limit of its own after the one before, the sixth
    answering 503 after six. Those that waited while it failed fail with it, sending nothing."""
    proxy, url = proxied_mongo
    sent: list[str] = []

    def hang(message: bytes) -> Fate:
        if _command(message) in ("find", "update"):
            sent.append(_command(message))
            time.sleep(1.5)  # past the limit
        return "deliver"

    async def race() -> list[object]:
        proxy.start()
        inner = await MongoStore.open(url, timeout_ms=1000, serving=False)
        store = MeteredStore(inner, Metrics())
        try:
            doc, _ = await store.create(DocumentCreate(title="t", content="c"))
            assert inner.words_added is not None
            await inner.words_added  # its reads are not the edits'
            proxy.fault = hang
            patch = DocumentUpdate(title="u")
            edits = [store.delete(doc.id), *(store.update(doc.id, patch) for _ in range(5))]
            outcomes: list[object] = await asyncio.gather(*edits, return_exceptions=True)
            return outcomes
        finally:
            proxy.fault = None
            await store.close()

    assert all(isinstance(outcome, StoreUnavailable) for outcome in anyio.run(race))
    assert sent == ["find"]


def test_reads_an_index_bounds_are_not_charged_a_slow_link(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """A link that holds each read 0.3 s but answers (below the time limit): a get by id and
    a plain page spend their unit and no more; a read by the clock cost 30 units each, and a few
    locked the key out past the slowdown. A filtered listing is still charged its time."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path, rate_limit="1000/minute") as client:
        doc = client.post("/v1/documents", json=DOC).json()
        before = _remaining(client)

        def slow_reads(message: bytes) -> Fate:
            if _command(message) == "find":
                time.sleep(0.3)
            return "deliver"

        proxy.fault = slow_reads
        for _ in range(2):
            assert client.get(f"/v1/documents/{doc['id']}").status_code == 200
            assert client.get("/v1/documents").status_code == 200
        proxy.fault = None
        assert _remaining(client) == before - 5  # four reads and this probe, a unit each


def test_a_create_is_acknowledged_only_once_its_document_is_stored(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """MongoDB refusing an insert as a duplicate id means the driver's retry of an insert that
    landed (its answer lost): 201. Refused so with nothing stored, the create was answered 201
    and its document was 404; now 503."""
    proxy, url = proxied_mongo
    proxy.start()
    # Time for the driver's retry on a new connection, on a busy host too (500 ms fell short).
    with mongo_app_client(url, tmp_path, mongo_timeout_ms=5_000) as client:
        lost = iter([True])
        proxy.fault = lambda m: (
            "drop reply" if _command(m) == "insert" and next(lost, False) else "deliver"
        )
        made = client.post("/v1/documents", json=DOC)
        assert made.status_code == 201
        assert client.get(f"/v1/documents/{made.json()['id']}").status_code == 200
        proxy.fault = lambda m: 11000 if _command(m) == "insert" else "deliver"
        assert_problem(client.post("/v1/documents", json=DOC), 503)
        proxy.fault = None
        assert [d["id"] for d in client.get("/v1/documents").json()["items"]] == [made.json()["id"]]


@pytest.mark.parametrize("lost_insert", ["the key's record", "the document"])
def test_a_keyed_create_whose_insert_answer_was_lost_is_the_original_not_a_replay(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path, lost_insert: str
) -> None:
    """The driver's retry of an insert (the key's record, then the document) finds its own
    first attempt: the request answers 201 as the original it is, without
    `Idempotent-Replayed`, which only a retry gets."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path, mongo_timeout_ms=5_000) as client:  # as above
        lost = iter([lost_insert == "the key's record", lost_insert == "the document"])
        proxy.fault = lambda m: (
            "drop reply" if _command(m) == "insert" and next(lost, False) else "deliver"
        )
        made = client.post("/v1/documents", json=DOC, headers=KEYED)
        assert made.status_code == 201
        assert "idempotent-replayed" not in made.headers
        proxy.fault = None
        again = client.post("/v1/documents", json=DOC, headers=KEYED)
        assert again.json() == made.json()
        assert again.headers["idempotent-replayed"] == "true"


def test_an_outage_is_logged_once_as_it_begins_and_once_as_it_ends(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MongoDB answers `hello` but refuses every operation, then refuses every read and takes
    every write (or the reverse: a full disk, no primary). Each probe's `hello` had ended the
    outage; and reads and writes are outages of their own, for each write had ended one outage
    for both and the next read begun it again: a pair of lines per pair of requests."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path) as client:
        doc = client.post("/v1/documents", json=DOC).json()
        caplog.set_level(logging.INFO)
        caplog.clear()
        proxy.fault = lambda m: "deliver" if _command(m) in ("hello", "isMaster") else 112
        for _ in range(3):
            assert_problem(client.get("/health/ready"), 503)
            assert_problem(client.get(f"/v1/documents/{doc['id']}"), 503)
        proxy.fault = None
        until_ready(client)
        proxy.fault = lambda m: 24 if _command(m) == "find" else "deliver"
        for n in range(3):
            assert_problem(client.get(f"/v1/documents/{doc['id']}"), 503)
            patched = client.patch(f"/v1/documents/{doc['id']}", json={"title": f"t{n}"})
            assert_problem(patched, 503)  # a PATCH reads the document first
            assert client.post("/v1/documents", json=DOC).status_code == 201
        proxy.fault = lambda m: 24 if _command(m) in ("insert", "update") else "deliver"
        for _ in range(3):
            assert_problem(client.post("/v1/documents", json=DOC), 503)
            assert client.get(f"/v1/documents/{doc['id']}").status_code == 200
        proxy.fault = None
        assert client.post("/v1/documents", json=DOC).status_code == 201
    outage = [
        (r.message, getattr(r, "operations", None))
        for r in caplog.records
        if r.message.startswith("store.")
    ]
    assert outage == [
        ("store.unavailable", "reads"),
        ("store.available", "reads"),
        ("store.unavailable", "reads"),
        ("store.unavailable", "writes"),
        ("store.available", "reads"),
        ("store.available", "writes"),
    ]


@pytest.mark.parametrize("code", [6, 24, 43, 89, 112, 133, 175, 237, 262, 9001, 11600, 11601])
def test_mongodb_answering_that_it_cannot_serve_is_503_never_500(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path, code: int
) -> None:
    """Error replies that mean MongoDB cannot serve right now (a node unreachable, shutting
    down, a lock it gave up on) were 500s, with a traceback logged each."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path) as client:
        doc = client.post("/v1/documents", json=DOC).json()
        proxy.fault = lambda m: code if _command(m) in ("find", "insert") else "deliver"
        assert_problem(client.get(f"/v1/documents/{doc['id']}"), 503)
        assert_problem(client.post("/v1/documents", json=DOC), 503)
        proxy.fault = None
        until_ready(client)  # a node shutting down is looked for again first
        assert client.get(f"/v1/documents/{doc['id']}").status_code == 200


@contextlib.contextmanager
def _connections_held_by_another_key(proxy: TcpProxy, client: TestClient) -> Iterator[None]:
    """Two creates of another key, each held by a slow server for a second, hold both of the
    driver's connections (maxPoolSize=2) while the block runs."""
    holding = threading.Semaphore(0)
    release = threading.Event()

    def held_inserts(message: bytes) -> Fate:
        if _command(message) == "insert" and b"documents" in message:
            holding.release()
            release.wait(10)  # the fault: a server that takes its time
        return "deliver"

    def write(_: int) -> None:
        other = {"X-API-Key": OTHER_KEY}
        assert client.post("/v1/documents", json=DOC, headers=other).status_code == 201

    proxy.fault = held_inserts
    writers = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for writer in writers:
        writer.start()
    try:
        for _ in writers:
            assert holding.acquire(timeout=10)  # both connections are held
        threading.Timer(1.0, release.set).start()  # the fault ends in a second
        yield
    finally:
        release.set()
        for writer in writers:
            writer.join()
        proxy.fault = None


def _remaining(client: TestClient) -> int:
    """What the key has left once a request that reads nothing (a 422) spent its unit."""
    refused = client.get("/v1/documents", params={"limit": "0"})
    return int(refused.headers["x-ratelimit-remaining"])


def test_a_read_is_not_charged_its_wait_for_a_connection_others_hold(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """This key's GET waits a second for a connection another key's writes hold: the wait is
    theirs, and the GET costs its key one unit."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(
        f"{url}&maxPoolSize=2", tmp_path, rate_limit="1000/minute", mongo_timeout_ms=5_000
    ) as client:
        doc = client.post("/v1/documents", json=DOC).json()
        before = _remaining(client)
        with _connections_held_by_another_key(proxy, client):
            assert client.get(f"/v1/documents/{doc['id']}").status_code == 200
        assert before - _remaining(client) == 2  # the GET's unit and the last 422's


def test_a_read_is_not_charged_its_wait_for_a_mongodb_that_came_back(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """MongoDB is away for a second and back within the read's time limit: the read waited to
    select a server, MongoDB's work took a moment. The wait is the outage's, not the key's."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path, rate_limit="1000/minute", mongo_timeout_ms=5_000) as c:
        doc = c.post("/v1/documents", json=DOC).json()
        before = _remaining(c)
        proxy.stop()
        back = threading.Timer(1.0, proxy.start)  # the fault: an outage of a second
        back.start()
        try:
            assert c.get(f"/v1/documents/{doc['id']}").status_code == 200
        finally:
            back.join()
        assert before - _remaining(c) == 2  # the GET's unit and the last 422's


@pytest.mark.parametrize("fate", ["cut", "drop reply"])
def test_a_read_is_not_charged_the_attempts_mongodb_never_answered(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path, fate: Fate
) -> None:
    """Each attempt is held 0.3 s, then cut or its answer lost, twice; the driver's retries
    end with an answer. The read pays for the attempt that was answered, not the others."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path, rate_limit="1000/minute", mongo_timeout_ms=5_000) as c:
        doc = c.post("/v1/documents", json=DOC).json()
        before = _remaining(c)
        faults = [fate, fate]

        def flaky(message: bytes) -> Fate:
            if _command(message) == "find" and faults:
                time.sleep(0.3)  # the fault: a network that holds, then fails
                return faults.pop()
            return "deliver"

        proxy.fault = flaky
        assert c.get(f"/v1/documents/{doc['id']}").status_code == 200
        proxy.fault = None
        assert not faults
        assert before - _remaining(c) <= 3  # the GET's unit, the 422's, and a margin


def test_a_wait_for_a_connection_takes_nothing_off_a_patchs_other_charges(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """A PATCH of a document of 100 000 characters is charged the time its words take to find
    (see test_hostile); its read's wait for a connection is left out of its read's time only,
    not taken off that charge."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(
        f"{url}&maxPoolSize=2", tmp_path, rate_limit="1000/minute", mongo_timeout_ms=5_000
    ) as client:
        body = {"title": "t", "content": "ἀλήθεια καὶ δόξα " * 5_880}
        doc_id = client.post("/v1/documents", json=body).json()["id"]
        before = _remaining(client)
        with _connections_held_by_another_key(proxy, client):
            assert client.patch(f"/v1/documents/{doc_id}", json={"title": "t1"}).status_code == 200
        assert before - _remaining(client) > 2  # the PATCH's unit, the 422's, its words' time


def test_every_mongodb_operation_carries_a_server_side_time_limit(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    proxy, url = proxied_mongo
    proxy.start()
    seen = _recording(proxy)
    # 5 s: the test server, behind the recording proxy, can take over 500 ms under load.
    with mongo_app_client(url, tmp_path, mongo_timeout_ms=5_000) as client:
        doc = client.post("/v1/documents", json=DOC, headers=KEYED).json()
        client.get(f"/v1/documents/{doc['id']}")
        client.get("/v1/documents", params={"q": "t", "limit": 1})
        client.patch(f"/v1/documents/{doc['id']}", json={"title": "u"})
        client.delete(f"/v1/documents/{doc['id']}")
        client.get("/health/ready")
        client.get("/metrics")
    handshakes = ("hello", "isMaster", "ismaster", "endSessions")
    operations = [c for c in seen if next(iter(c)) not in handshakes]
    assert {next(iter(c)) for c in operations} >= {"insert", "find", "update", "count"}
    assert [next(iter(c)) for c in operations if "maxTimeMS" not in c] == []


def test_a_failed_pass_for_missing_words_retries_itself_and_requests_do_not_restart_it(
    proxied_mongo: tuple[TcpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, url = proxied_mongo
    proxy.start()
    monkeypatch.setattr(mongo_store, "WORDS_RETRY_SECONDS", 0.2)
    failed = threading.Event()

    class Failures(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "store.words_not_added":
                failed.set()

    handler = Failures()
    logging.getLogger("documents.store").addHandler(handler)

    async def scenario() -> tuple[list[str], int]:
        store = await MongoStore.open(url, serving=False)
        assert store.words_added is not None
        await store.words_added  # the rules recorded: the next start looks for missing words
        for i in range(20):
            await store.create(DocumentCreate(title=f"Old {i}", content="c"))
        await store.close()
        await _as_an_earlier_version_left(url, {})
        # The pass's reads are cut until the test heals the network.
        proxy.cut_when = lambda m: _command(m) == "find" and b"words_created" in m
        store = await MongoStore.open(url, timeout_ms=2000, serving=False)
        await anyio.to_thread.run_sync(failed.wait, 30)
        seen = _recording(proxy)
        for i in range(5):
            await store.page(DocumentQuery(), limit=1)
            await store.create(DocumentCreate(title=f"New {i}", content="c"))
        after_failure = [next(iter(c)) for c in seen]
        proxy.cut_when = None
        assert store.words_added is not None
        added = await store.words_added
        await store.close()
        return after_failure, added

    try:
        after_failure, added = anyio.run(scenario)
    finally:
        logging.getLogger("documents.store").removeHandler(handler)
    assert "createIndexes" not in after_failure
    assert added == 20


# --- several workers --------------------------------------------------------------------------


# --- idempotent creates under lost writes -----------------------------------------------------

# How an insert into the documents collection starts on the wire: {"insert": "documents", ...}.
INSERT_INTO_DOCUMENTS = b"insert\x00\x0a\x00\x00\x00documents\x00"
KEYED = {"Idempotency-Key": "order-42"}


def test_a_create_whose_insert_is_cut_is_finished_by_its_retry(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """The key is claimed, then every insert into the documents collection is cut (pymongo's own
    retry included): 503. Once the network heals, the same key and body create the document,
    and a further retry replays it; a different body is still a 409."""
    proxy, url = proxied_mongo
    proxy.start()
    with mongo_app_client(url, tmp_path) as client:
        proxy.cut_when = lambda message: INSERT_INTO_DOCUMENTS in message
        cut = client.post("/v1/documents", json=DOC, headers=KEYED)
        assert_problem(cut, 503)
        proxy.cut_when = None
        # The cut connection drops the server from the driver's view until its monitor sees it
        # again: a client retries after the 503's Retry-After, once the service is ready.
        until_ready(client)
        assert client.get("/v1/documents").json()["items"] == []
        retried = client.post("/v1/documents", json=DOC, headers=KEYED)
        assert retried.status_code == 201
        again = client.post("/v1/documents", json=DOC, headers=KEYED)
        assert again.json() == retried.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert client.get("/v1/documents").json()["items"] == [retried.json()]
        other = client.post("/v1/documents", json={**DOC, "title": "other"}, headers=KEYED)
        assert_problem(other, 409)


def _lose_the_document_insert(mongo_url: str, doc_id: str) -> None:
    """The state a worker killed between the two writes leaves: the claim, no document."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_url, directConnection=True
    )
    with client:
        database = client.get_default_database()
        assert database["documents"].delete_one({"_id": doc_id}).deleted_count == 1
        assert database["idempotency"].count_documents({}) == 1


async def _create(store: MongoStore, body: dict[str, Any]) -> tuple[Any, bool]:
    return await store.create(DocumentCreate.model_validate(body), idempotency=KEY_SCOPE)


KEY_SCOPE = IdempotencyKey("alice", "order-42")


def test_retries_racing_a_lost_create_make_exactly_one_document(mongo_url: str) -> None:
    async def scenario() -> None:
        store = await MongoStore.open(mongo_url, serving=False)
        try:
            first, _ = await _create(store, DOC)
            _lose_the_document_insert(mongo_url, first.id)
            results = []

            async def retry() -> None:
                results.append(await _create(store, DOC))

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(retry)
            assert {doc.id for doc, _ in results} == {first.id}
            assert all(replayed for _, replayed in results)
            assert [d.id async for d in store.export_documents()] == [first.id]
            # The key's record holds no words (a document of many short words is several times
            # its text); the retry that finished the create found them again.
            found, _ = await store.page(
                DocumentQuery.model_validate({"q": DOC["content"]}), limit=10
            )
            assert [d.id for d in found] == [first.id]
        finally:
            await store.close()

    anyio.run(scenario)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_url, directConnection=True
    )
    with client:
        claim = client.get_default_database()["idempotency"].find_one()
    assert claim is not None
    assert "words" not in claim["document"]


@pytest.mark.parametrize("patched", [False, True], ids=["deleted", "patched then deleted"])
def test_a_retry_after_a_real_delete_is_409_and_brings_nothing_back(
    mongo_url: str, tmp_path: Path, patched: bool
) -> None:
    with mongo_app_client(mongo_url, tmp_path) as client:
        doc = client.post("/v1/documents", json=DOC, headers=KEYED).json()
        if patched:
            client.patch(f"/v1/documents/{doc['id']}", json={"title": "changed"})
        assert client.delete(f"/v1/documents/{doc['id']}").status_code == 204
        assert (
            "deleted"
            in assert_problem(client.post("/v1/documents", json=DOC, headers=KEYED), 409)["detail"]
        )
        assert client.get("/v1/documents").json()["items"] == []


def test_a_deleted_documents_key_keeps_none_of_its_text(mongo_url: str) -> None:
    """A delete is for good: the key's record keeps what a retry needs to answer 409 (the
    body's fingerprint, the document's id, that it is deleted), not the document."""

    async def scenario() -> tuple[Document, Any]:
        store = await MongoStore.open(mongo_url, serving=False)
        secret = {**DOC, "content": "a secret the delete takes away"}
        try:
            doc, _ = await _create(store, secret)
            await store.delete(doc.id)
            return doc, await _outcome(_create(store, secret))
        finally:
            await store.close()

    doc, retried = anyio.run(scenario)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_url, directConnection=True
    )
    with client:
        claim = client.get_default_database()["idempotency"].find_one()
    assert claim is not None
    assert claim["document"] == {"_id": doc.id}
    assert "secret" not in str(claim)
    assert isinstance(retried, IdempotencyConflict)
    assert "deleted" in str(retried)


# --- a delete racing the create its document came from, with faults at every step --------------

# The commands that read or change data; handshakes and heartbeats pass untouched.
DATA_COMMANDS = {"insert", "find", "update", "delete", "findAndModify"}
FATES: list[Fate] = ["deliver", "cut", "drop reply"]


def _command(message: bytes) -> str:
    """The command an OP_MSG carries (its first section's first key)."""
    if int.from_bytes(message[12:16], "little") != OP_MSG or message[20] != 0:
        return ""
    return next(iter(bson.decode(message[21 : 21 + int.from_bytes(message[21:25], "little")])))


class Interleaving:
    """Each operation gets its own relay (its own worker) and a seeded plan: for each of its
    data commands in turn, deliver, cut, drop the reply, or hold it until every other operation
    has finished (one held at a time, so two holds never wait on each other). The operation
    named `lose_reply` has the reply of its first write (an update) dropped, held or not."""

    def __init__(
        self,
        seed: int,
        server: SecantusDBServer,
        names: list[str],
        steps: tuple[str, ...] = ("deliver", "hold", "cut", "drop reply"),
        lose_reply: str = "",
    ) -> None:
        self.done = {name: threading.Event() for name in names}
        self.proxies = {name: TcpProxy(server.address) for name in names}
        self._holding = threading.Lock()
        self._lose_reply = lose_reply
        for name, proxy in self.proxies.items():
            plan = random.Random(f"{seed}:{name}").choices(steps, [5, 3, 1, 1][: len(steps)], k=12)
            proxy.fault = self._fault(name, iter(plan))
            proxy.start()

    def _fault(self, name: str, plan: Iterator[str]) -> Callable[[bytes], Fate]:
        def fate(message: bytes) -> Fate:
            command = _command(message)
            if command not in DATA_COMMANDS:
                return "deliver"
            step = next(plan, "deliver")
            if step == "hold" and self._holding.acquire(blocking=False):
                try:
                    for other, finished in self.done.items():
                        if other != name:
                            finished.wait(30)
                finally:
                    self._holding.release()
            if name == self._lose_reply and command == "update":
                self._lose_reply = ""
                return "drop reply"
            return step if step in FATES else "deliver"

        return fate

    def url(self, name: str, database: str) -> str:
        return f"mongodb://{self.proxies[name].address}/{database}?directConnection=true"

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()

    async def run(
        self, calls: dict[str, Callable[[], Awaitable[Any]]], stores: dict[str, MongoStore]
    ) -> dict[str, Any]:
        """Every operation at once, each through its relay: what each would answer. Closes the
        stores and the relays."""
        outcomes: dict[str, Any] = {}

        async def run(name: str) -> None:
            outcomes[name] = await _outcome(calls[name]())
            self.done[name].set()

        try:
            async with anyio.create_task_group() as tg:
                for name in self.done:
                    tg.start_soon(run, name)
        finally:
            for store in stores.values():
                await store.close()
            self.stop()
        return outcomes


def _server_of(seed: int, request: pytest.FixtureRequest) -> SecantusDBServer:
    """Odd seeds run on a standalone server, where the driver retries no write."""
    server: SecantusDBServer = request.getfixturevalue(
        "standalone_mongo_server" if seed % 2 else "mongo_server"
    )
    return server


async def _first_document(url: str, *, lose_insert: bool) -> tuple[MongoStore, Document]:
    """A store without a relay, and the keyed create the races are about; with `lose_insert`,
    left as a worker killed between its two writes leaves it (the claim, no document)."""
    plain = await MongoStore.open(url, serving=False)
    first, _ = await _create(plain, DOC)
    if lose_insert:
        await anyio.to_thread.run_sync(_lose_the_document_insert, url, first.id)
    return plain, first


async def _outcome(call: Awaitable[Any]) -> Any:
    """What the API would answer: the result, or the store error it maps to a status."""
    try:
        return await call
    except (StoreUnavailable, DocumentNotFound, PreconditionFailed, IdempotencyConflict) as exc:
        return exc


@pytest.mark.parametrize("seed", range(40))
def test_a_delete_and_retries_of_the_create_it_undoes_act_one_at_a_time(
    request: pytest.FixtureRequest, mongo_url: str, seed: int
) -> None:
    """A keyed create, maybe with its document insert lost, then concurrently: a retry of it, a
    DELETE (with or without If-Match), maybe a PATCH, each through a relay that holds, cuts or
    drops the replies of its commands as the seed says. Whatever happened: a delete that
    answered 204 is final (the document never comes back and the key answers 409), and as long
    as the document exists the key replays it (never a false 409). Odd seeds run on a
    standalone server, where the driver retries no write."""
    rng = random.Random(seed)
    database = mongo_url.rsplit("/", 1)[1]
    server = _server_of(seed, request)
    mongo_url = f"{server.uri}{database}"
    names = ["retry", "delete", *(["patch"] if rng.random() < 0.5 else [])]
    if_version = rng.choice([None, 1])
    lose_insert = rng.random() < 0.3

    async def scenario() -> None:
        plain, first = await _first_document(mongo_url, lose_insert=lose_insert)
        races = Interleaving(seed, server, names)
        stores = {
            n: await MongoStore.open(races.url(n, database), timeout_ms=3000, serving=False)
            for n in names
        }
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "retry": lambda: _create(stores["retry"], DOC),
            "delete": lambda: stores["delete"].delete(first.id, if_version=if_version),
            "patch": lambda: stores["patch"].update(first.id, DocumentUpdate(title="patched")),
        }
        outcomes = await races.run(calls, stores)
        exists = await _outcome(plain.get(first.id))
        final = await _outcome(_create(plain, DOC))
        after = await _outcome(plain.get(first.id))
        await plain.close()

        deleted = outcomes["delete"] is None or isinstance(outcomes["retry"], IdempotencyConflict)
        if deleted or (isinstance(exists, DocumentNotFound) and not lose_insert):
            assert isinstance(exists, DocumentNotFound), outcomes
            assert isinstance(final, IdempotencyConflict), outcomes
            assert isinstance(after, DocumentNotFound), outcomes
        if not isinstance(exists, DocumentNotFound):
            assert final == (exists, True), outcomes
        if not isinstance(final, IdempotencyConflict):
            assert final[0].id == first.id
            assert after == final[0]

    anyio.run(scenario)


@contextlib.asynccontextmanager
async def _plain_and_relayed(
    server: SecantusDBServer, database: str, proxy: TcpProxy
) -> AsyncIterator[tuple[MongoStore, MongoStore]]:
    """A store straight on `server` and one through `proxy`; both closed, and the proxy
    stopped, after."""
    plain = await MongoStore.open(f"{server.uri}{database}", serving=False)
    relayed = await MongoStore.open(
        f"mongodb://{proxy.address}/{database}?directConnection=true",
        timeout_ms=2000,
        serving=False,
    )
    try:
        yield plain, relayed
    finally:
        await relayed.close()
        await plain.close()
        proxy.stop()


def test_a_delete_answered_503_that_lands_later_cannot_delete_a_version_written_since(
    standalone_mongo_server: SecantusDBServer, mongo_url: str
) -> None:
    """The delete's write, and its retry, are lost on the wire: the client hears 503 (happened
    or not). A PATCH then succeeds. When the first write reaches MongoDB at last (replayed here
    byte for byte, as a relay that had held it would deliver it), it must match nothing."""
    database = mongo_url.rsplit("/", 1)[1]
    proxy = TcpProxy(standalone_mongo_server.address)
    held: list[bytes] = []

    def fate(message: bytes) -> Fate:
        if b"deleted_by" not in message:
            return "deliver"
        held.append(message)
        return "cut"

    proxy.fault = fate
    proxy.start()

    async def scenario() -> None:
        async with _plain_and_relayed(standalone_mongo_server, database, proxy) as stores:
            plain, relayed = stores
            doc, _ = await plain.create(DocumentCreate(title="t", content="c"))
            with pytest.raises(StoreUnavailable):
                await relayed.delete(doc.id)
            patched = await plain.update(doc.id, DocumentUpdate(title="patched"))
            with socket.create_connection(standalone_mongo_server.address) as late:
                late.sendall(held[0])
                assert _read_message(late)  # MongoDB has run it
            assert await plain.get(doc.id) == patched
            await plain.delete(doc.id)
            with pytest.raises(DocumentNotFound):
                await plain.get(doc.id)

    anyio.run(scenario)


def test_a_delete_retried_after_a_lost_reply_leaves_a_copy_restored_in_between(
    standalone_mongo_server: SecantusDBServer, mongo_url: str
) -> None:
    """A delete's write lands but its reply is lost; before the delete sends it again, the same
    document (same id and version) is restored over its tombstone. The retry must not delete
    the restored copy: the delete answers as it happened once (204), the copy stays. On a
    standalone server, where the driver retries no write: the store's own retry is the one."""
    database = mongo_url.rsplit("/", 1)[1]
    proxy = TcpProxy(standalone_mongo_server.address)
    writes: list[bytes] = []
    retry_held, restored = threading.Event(), threading.Event()

    def fate(message: bytes) -> Fate:
        if b"deleted_by" not in message:
            return "deliver"
        writes.append(message)
        if len(writes) == 1:
            return "drop reply"
        retry_held.set()
        restored.wait(10)
        return "deliver"

    proxy.fault = fate
    proxy.start()

    async def scenario() -> None:
        async with _plain_and_relayed(standalone_mongo_server, database, proxy) as stores:
            plain, relayed = stores
            try:
                doc, _ = await plain.create(DocumentCreate(title="t", content="c"))
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(relayed.delete, doc.id)
                    assert await anyio.to_thread.run_sync(retry_held.wait, 10)
                    assert await plain.import_documents([doc])  # over the first write's tombstone
                    restored.set()
                assert await plain.get(doc.id) == doc
            finally:
                restored.set()

    anyio.run(scenario)


@pytest.mark.parametrize("seed", range(24))
def test_a_delete_whose_reply_is_lost_answers_as_it_happened_once(
    request: pytest.FixtureRequest, mongo_url: str, seed: int
) -> None:
    """A DELETE (with or without If-Match) whose write reaches MongoDB but whose reply is lost,
    racing, as the seed says, a PATCH, a retry of the keyed create and a second DELETE, whose
    commands are delivered or held until the others are done. The delete that happened answers
    204, and only it; one that lost answers 404 (deleted by another) or 412 (patched first),
    never 503; and a deleted document never comes back. Odd seeds run on a standalone server,
    where the driver retries no write."""
    rng = random.Random(seed)
    database = mongo_url.rsplit("/", 1)[1]
    server = _server_of(seed, request)
    mongo_url = f"{server.uri}{database}"
    others = [n for n in ("patch", "retry", "delete again") if rng.random() < 0.6]
    names = ["delete", *others]
    if_version = rng.choice([None, 1])
    lose_insert = rng.random() < 0.3

    async def scenario() -> None:
        plain, first = await _first_document(mongo_url, lose_insert=lose_insert)
        races = Interleaving(seed, server, names, ("deliver", "hold"), lose_reply="delete")
        stores = {
            n: await MongoStore.open(races.url(n, database), timeout_ms=3000, serving=False)
            for n in names
        }
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "delete": lambda: stores["delete"].delete(first.id, if_version=if_version),
            "delete again": lambda: stores["delete again"].delete(first.id),
            "patch": lambda: stores["patch"].update(first.id, DocumentUpdate(title="patched")),
            "retry": lambda: _create(stores["retry"], DOC),
        }
        outcomes = await races.run(calls, stores)
        exists = await _outcome(plain.get(first.id))
        final = await _outcome(_create(plain, DOC))
        await plain.close()

        assert not any(isinstance(o, StoreUnavailable) for o in outcomes.values()), outcomes
        deletes = [outcomes[n] for n in ("delete", "delete again") if n in outcomes]
        deleted = sum(outcome is None for outcome in deletes)
        # Deleted once, or not at all (the key then replays the document, re-inserting it if
        # its insert was lost and no retry made it).
        assert deleted == isinstance(final, IdempotencyConflict), (outcomes, exists)
        if deleted or not lose_insert:
            assert deleted == isinstance(exists, DocumentNotFound), (outcomes, exists)
        if not isinstance(exists, DocumentNotFound):
            assert final == (exists, True), outcomes
        assert all(o is None or isinstance(o, DocumentNotFound) for o in deletes[1:]), outcomes
        if isinstance(outcomes["delete"], PreconditionFailed):
            assert if_version == 1, outcomes
            assert outcomes["patch"].version == 2, outcomes

    anyio.run(scenario)


def test_a_document_restored_then_deleted_again_never_comes_back_through_its_key(
    mongo_url: str,
) -> None:
    """A restore (import) brings a deleted document back within its key's 24 h; deleting it
    again is as final as the first delete: a retry of its create answers 409."""

    async def scenario() -> tuple[Any, Any]:
        store = await MongoStore.open(mongo_url, serving=False)
        try:
            doc, _ = await _create(store, DOC)
            await store.delete(doc.id)
            assert await store.import_documents([doc])
            await store.delete(doc.id)
            return await _outcome(_create(store, DOC)), await _outcome(store.get(doc.id))
        finally:
            await store.close()

    retried, read = anyio.run(scenario)
    assert isinstance(retried, IdempotencyConflict)
    assert isinstance(read, DocumentNotFound)


def test_a_key_an_earlier_version_marked_deleted_replays_its_document_only_while_it_exists(
    mongo_url: str,
) -> None:
    """Earlier versions marked the key before deleting (and left no tombstone)."""

    async def scenario() -> tuple[Any, Any]:
        store = await MongoStore.open(mongo_url, serving=False)
        first, _ = await _create(store, DOC)
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
        keys = client.get_default_database()["idempotency"]
        await keys.update_one({}, {"$set": {"deleted": True}})
        kept = await _outcome(_create(store, DOC))  # the delete that marked it did not happen
        await client.get_default_database()["documents"].delete_one({"_id": first.id})
        gone = await _outcome(_create(store, DOC))
        await client.close()
        after = await _outcome(store.get(first.id))
        await store.close()
        return (kept, first), (gone, after)

    (kept, first), (gone, after) = anyio.run(scenario)
    assert kept == (first, True)
    assert isinstance(gone, IdempotencyConflict)
    assert isinstance(after, DocumentNotFound)


def test_liveness_answers_at_once_while_mongodb_does_not_then_all_recovers(
    service_factory: ServiceFactory, mongo_server: SecantusDBServer, mongo_url: str
) -> None:
    """MongoDB black-holed (connections accepted, nothing answered): /health answers at once,
    readiness and the API answer 503 within the MongoDB timeout, and when MongoDB answers
    again the indexes are made and everything works."""
    proxy = TcpProxy(mongo_server.address)
    proxy.black_hole = True
    proxy.start()
    try:
        database = mongo_url.rsplit("/", 1)[1]
        url = f"mongodb://{proxy.address}/{database}?directConnection=true"
        service = service_factory(
            env={"DATABASE_URL": url, "WORKERS": "2", "MONGO_TIMEOUT_MS": "1000"}
        )
        service.start(wait=False)
        service.wait_for_line("Application startup complete", timeout=30, count=2)
        with service.client() as client:
            assert client.get("/health").status_code == 200
            assert_problem(client.get("/health/ready"), 503)
            assert_problem(client.post("/v1/documents", json=DOC), 503)
            proxy.black_hole = False
            proxy.stop()  # cut the connections that hold swallowed requests
            proxy.start()
            deadline = time.monotonic() + 30
            # Each worker makes its indexes in its own time: a new connection may reach the
            # one still making them after the other answered ready.
            while (
                client.get("/health/ready").status_code != 200
                or client.post("/v1/documents", json=DOC).status_code != 201
            ):
                assert time.monotonic() < deadline, "did not recover"
    finally:
        proxy.stop()


def test_probes_while_mongodb_is_down_write_one_line_however_many(
    service_factory: ServiceFactory, mongo_server: SecantusDBServer, mongo_url: str
) -> None:
    """Each keyless probe while MongoDB was down wrote three lines (the store's warning, an
    access line, a slow request): 39 bytes sent, 778 logged. The outage is now logged once as
    it begins and once as it ends, and probes write nothing of their own."""
    proxy = TcpProxy(mongo_server.address)
    proxy.start()
    database = mongo_url.rsplit("/", 1)[1]
    url = f"mongodb://{proxy.address}/{database}?directConnection=true"
    service = service_factory(env={"DATABASE_URL": url, "MONGO_TIMEOUT_MS": "300"}).start()
    try:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            until_ready(client)
            # A read MongoDB answers, whose access line marks where the outage's lines begin
            # (what the service printed before it, a slow start's lines, may come in later).
            marker = client.get("/v1/documents/before-the-outage", headers={"X-API-Key": KEY})
            assert_problem(marker, 404)
            service.wait_for_line("before-the-outage", timeout=10)
            proxy.stop()
            for _ in range(10):
                assert_problem(client.get("/health/ready"), 503)
            proxy.start()
            deadline = time.monotonic() + 30
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "did not recover"
        service.stop_quietly()
    finally:
        proxy.stop()
    lines = [json.loads(line) for line in service.output if line.startswith("{")]
    lines = lines[next(n for n, line in enumerate(lines) if "before-the-outage" in str(line)) + 1 :]
    # Up to the outage's end: later, a slow machine's commands may time out (MONGO_TIMEOUT_MS).
    lines = lines[
        : next(n for n, line in enumerate(lines) if line["message"] == "store.available") + 1
    ]
    outage = [line for line in lines if line["message"] in ("store.unavailable", "store.available")]
    assert [line["message"] for line in outage] == ["store.unavailable", "store.available"]
    assert proxy.address in outage[0]["error"]  # where, and why: the connection went
    assert not [line for line in lines if line["message"] in ("request", "request.slow")]


def test_credentials_refused_after_a_start_without_mongodb_are_logged_once_and_not_ready(
    service_factory: ServiceFactory, mongo_server: SecantusDBServer
) -> None:
    """The service starts while MongoDB cannot be reached; MongoDB then answers but refuses the
    credentials. Readiness stays 503; the cause is logged once, naming the credentials and not
    the password, however often the build is tried again; and it is tried again after a pause,
    not in a tight loop."""
    proxy = TcpProxy(mongo_server.address)  # bound, not listening: connections are refused
    attempts: list[float] = []  # when each authentication reached MongoDB
    changed = threading.Condition()

    def record(message: bytes) -> Fate:
        if b"saslStart" in message:
            with changed:
                attempts.append(time.monotonic())
                changed.notify_all()
        return "deliver"

    proxy.fault = record
    url = f"mongodb://ada:wrong-password@{proxy.address}/d?directConnection=true"
    service = service_factory(env={"DATABASE_URL": url, "MONGO_TIMEOUT_MS": "1000"}).start()
    try:
        unreachable = json.loads(service.wait_for_line("store.unreachable_at_startup", 10))
        assert f"{proxy.address}: [Errno 111]" in unreachable["error"]  # refused, and where
        proxy.start()
        pause = mongo_store.INDEX_RETRY_SECONDS
        with changed:  # until the build has been refused, paused and tried again
            assert changed.wait_for(lambda: attempts and attempts[-1] - attempts[0] >= pause, 30)
            assert len(attempts) <= 4, attempts  # two tries: no tight loop
        with service.client() as client:
            assert_problem(client.get("/health/ready"), 503)
            assert_problem(client.get("/v1/documents"), 503)
    finally:
        proxy.stop()
    lines = [json.loads(line) for line in service.output if line.startswith("{")]
    refused = [line for line in lines if line["message"] == "store.indexes_refused"]
    assert len(refused) == 1, refused
    assert refused[0]["level"] == "ERROR"
    assert "authentication failed" in refused[0]["error"].lower()
    assert "wrong-password" not in "".join(service.output)


def test_a_worker_that_cannot_start_stops_the_service_with_a_non_zero_exit(
    service_factory: ServiceFactory, mongo_server: SecantusDBServer
) -> None:
    host, port = mongo_server.address
    url = f"mongodb://ada:wrong-password@{host}:{port}/d?directConnection=true"
    service = service_factory(env={"DATABASE_URL": url, "WORKERS": "2"})
    service.start(wait=False)
    assert service.proc is not None
    assert service.proc.wait(30) != 0
    output = service.rest_of_output()
    assert "authentication failed" in output
    assert "wrong-password" not in output
    assert "Traceback" not in output


def test_stopping_several_workers_leaves_no_process_and_no_metrics_directory(
    service_factory: ServiceFactory, mongo_url: str, tmp_path: Path
) -> None:
    # The service's own temporary directory, so other programs' files there do not count.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    service = two_workers(service_factory, mongo_url, TMPDIR=str(tmp))
    assert service.proc is not None
    group = service.proc.pid
    assert list(tmp.glob("documents-metrics-*"))
    service.stop_quietly()
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously: poll the kernel
    while _living_members(group) and time.monotonic() < deadline:
        pass
    assert _living_members(group) == []  # no worker, no resource tracker
    assert list(tmp.iterdir()) == []


def _living_members(group: int) -> list[int]:
    """Processes of the group that are not zombies (a zombie is only waiting to be reaped)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            living.append(int(stat.parent.name))
    return living


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_serving(tmp_path) as url:
        yield url


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A relay in front of the test's Redis, started: stopping it is a Redis outage."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(("127.0.0.1", port), wire=False)
    proxy.start()
    yield proxy
    proxy.stop()


@contextlib.contextmanager
def redis_serving(tmp_path: Path, *options: str) -> Iterator[str]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run must install it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *options,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # redis says when it accepts connections
        if b"Ready to accept connections" in line:
            break
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def two_workers(service_factory: ServiceFactory, mongo_url: str, **env: str) -> Service:
    service: Service = service_factory(env={"DATABASE_URL": mongo_url, "WORKERS": "2", **env})
    service.start(wait=False)
    # Each worker announces its own startup: wait for both.
    service.wait_for_line("Application startup complete", timeout=30, count=2)
    return service


def fresh_connection_get(url: str, path: str, key: str = KEY) -> httpx.Response:
    # A new connection per request, so the kernel spreads them over both workers.
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=10) as client:
        return client.get(path)


def test_two_workers_share_the_rate_limit_through_redis(
    service_factory: ServiceFactory, mongo_url: str, redis_url: str
) -> None:
    service = two_workers(
        service_factory, mongo_url, RATE_LIMIT="10/minute", RATE_LIMIT_STORAGE_URI=redis_url
    )
    # A request that reads nothing (a 422): one unit each, whatever the test server's speed (a
    # listing it takes more than 10 ms to read costs more).
    requests = (fresh_connection_get(service.url, "/v1/documents?limit=0") for _ in range(20))
    statuses = [response.status_code for response in requests]
    assert statuses.count(422) == 10
    assert statuses.count(429) == 10


@pytest.mark.parametrize("fault", ["black hole", "down"])
def test_a_redis_that_cannot_answer_costs_requests_a_bounded_503_never_liveness(
    service_factory: ServiceFactory, mongo_url: str, redis_proxy: TcpProxy, fault: str
) -> None:
    """Limits are spent asynchronously with a one-second bound: with Redis black-holed or down,
    /health answers at once on every worker, /v1 answers 503 with Retry-After within the
    bound, readiness says not ready, and all recovers when Redis answers again."""
    service = two_workers(
        service_factory,
        mongo_url,
        RATE_LIMIT_STORAGE_URI=f"redis://{redis_proxy.address}/0",
    )
    assert fresh_connection_get(service.url, "/v1/documents").status_code == 200
    if fault == "black hole":
        redis_proxy.black_hole = True
    else:
        redis_proxy.stop()
    # A new connection per request, so the kernel spreads them over both workers; the client
    # made once, outside the times measured (making one took up to 0.3 s on a busy machine).
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=service.url, headers={"X-API-Key": KEY}, limits=fresh) as client:
        for _ in range(4):
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            # Well under the one-second bound a request spends waiting on Redis: never waited.
            assert time.monotonic() - started < LIMITER_TIMEOUT
            started = time.monotonic()
            refused = client.get("/v1/documents")
            assert time.monotonic() - started < 3
            assert_problem(refused, 503)
            assert refused.headers["retry-after"] == "5"
    assert_problem(fresh_connection_get(service.url, "/health/ready"), 503)
    redis_proxy.black_hole = False
    redis_proxy.stop()
    redis_proxy.start()
    deadline = time.monotonic() + 30
    # Each worker finds its pooled connections dead on its own next use: a worker that has
    # served nothing since may answer its first probe 503, then recovers with the rest.
    for path in ("/v1/documents", "/health/ready", "/health/ready"):
        while fresh_connection_get(service.url, path).status_code != 200:
            assert time.monotonic() < deadline, f"{path} did not recover"


def test_read_time_is_charged_through_redis_and_a_failed_charge_still_answers(
    mongo_url: str, redis_proxy: TcpProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The units a listing's reads cost beyond the first go through Redis like the first; when
    Redis fails them, the answered request stays answered and the failure is logged."""
    anyio.run(seed_common, make_settings(tmp_path, database_url=mongo_url), 300)
    budget = 5_000  # room for listings of up to MONGO_TIMEOUT_MS, at READ_UNIT_S a unit
    with mongo_app_client(
        mongo_url,
        tmp_path,
        rate_limit=f"{budget}/minute",
        rate_limit_storage_uri=f"redis://{redis_proxy.address}/0",
        mongo_timeout_ms=10_000,  # the test server walks every document of a listing
    ) as client:
        assert client.get("/v1/documents", params=SPARSE).status_code == 200
        charged = budget - _remaining(client) - 1
        assert charged > 1
        # limits' increment script, by more than one unit: cut the connection instead.
        redis_proxy.cut_when = lambda message: (
            message.startswith(b"*6\r\n$7\r\nEVALSHA") and not message.endswith(b"\r\n$1\r\n1\r\n")
        )
        caplog.clear()
        assert client.get("/v1/documents", params=SPARSE).status_code == 200
        assert "rate_limit.unavailable" in caplog.messages
        assert _remaining(client) == budget - charged - 3  # the first probe, the listing, this one


def test_a_redis_outage_is_logged_once_as_it_begins_and_once_as_it_ends(
    redis_proxy: TcpProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes and keyed requests while Redis is down: one `rate_limit.unavailable` line, no
    `rate_limit.available` line until Redis answers again, then one."""
    with app_client(
        tmp_path,
        headers={"X-API-Key": KEY},
        rate_limit_storage_uri=f"redis://{redis_proxy.address}/0",
    ) as client:
        until_ready(client)
        caplog.set_level(logging.INFO)
        caplog.clear()
        redis_proxy.stop()
        for _ in range(3):
            assert client.get("/health/ready").status_code == 503
            assert client.get("/v1/documents").status_code == 503
        assert caplog.messages.count("rate_limit.unavailable") == 1
        assert "rate_limit.available" not in caplog.messages
        redis_proxy.start()
        until_ready(client)
        assert client.get("/v1/documents").status_code == 200
        assert caplog.messages.count("rate_limit.unavailable") == 1
        assert caplog.messages.count("rate_limit.available") == 1


def test_each_service_logs_the_outage_of_its_own_redis(
    redis_url: str, redis_proxy: TcpProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two services in one process, one of whose Redis stops: its outage is one line, and the
    other's Redis answering says nothing about it."""
    with (
        app_client(
            tmp_path / "down",
            headers={"X-API-Key": KEY},
            rate_limit_storage_uri=f"redis://{redis_proxy.address}/0",
        ) as down,
        app_client(
            tmp_path / "up", headers={"X-API-Key": KEY}, rate_limit_storage_uri=redis_url
        ) as up,
    ):
        until_ready(down)
        caplog.set_level(logging.INFO)
        caplog.clear()
        redis_proxy.stop()
        for _ in range(3):
            assert down.get("/v1/documents").status_code == 503
            assert up.get("/v1/documents").status_code == 200
        assert caplog.messages.count("rate_limit.unavailable") == 1
        assert "rate_limit.available" not in caplog.messages


def test_a_redis_that_refuses_the_password_is_logged_as_refusing_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password is not an unreachable Redis: the outage line names Redis's refusal."""
    with (
        redis_serving(tmp_path, "--requirepass", "the-password") as url,
        app_client(
            tmp_path,
            headers={"X-API-Key": KEY},
            rate_limit_storage_uri=url.replace("redis://", "redis://:not-the-password@"),
        ) as client,
    ):
        caplog.set_level(logging.INFO)
        assert client.get("/health/ready").status_code == 503
        assert client.get("/v1/documents").status_code == 503
    [error] = [r.__dict__["error"] for r in caplog.records if r.msg == "rate_limit.unavailable"]
    assert "AuthenticationError" in error
    assert "unreachable" not in error


def test_connections_redis_closed_while_idle_cost_no_request_a_503(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis drops idle clients (its `timeout`, a restart, CLIENT KILL): the pooled connections
    are dead, Redis is not. Requests that meet one are answered, and no outage is logged."""
    with app_client(
        tmp_path, headers={"X-API-Key": KEY}, rate_limit_storage_uri=redis_url
    ) as client:

        def served(_: int) -> None:
            assert client.get("/v1/documents").status_code == 200

        run_threads(served)  # several at once: several pooled connections
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        caplog.clear()
        statuses = [client.get("/v1/documents").status_code for _ in range(10)]
        statuses += [client.get("/health/ready").status_code for _ in range(10)]
    assert set(statuses) == {200}
    assert "rate_limit.unavailable" not in caplog.messages


def test_two_workers_racing_on_one_if_match_exactly_one_wins(
    service_factory: ServiceFactory, mongo_url: str
) -> None:
    service = two_workers(service_factory, mongo_url)
    with service.client() as client:
        doc = client.post("/v1/documents", json=DOC).json()
    results: list[int] = []
    barrier = threading.Barrier(8)

    def racer(n: int) -> None:
        with service.client() as client:
            barrier.wait()
            response = client.patch(
                f"/v1/documents/{doc['id']}",
                json={"title": f"winner {n}"},
                headers={"If-Match": '"1"'},
            )
            results.append(response.status_code)

    run_threads(racer)
    assert sorted(results) == [200] + [412] * 7
    with service.client() as client:
        assert client.get(f"/v1/documents/{doc['id']}").json()["version"] == 2


def test_metrics_add_up_across_two_workers(service_factory: ServiceFactory, mongo_url: str) -> None:
    service = two_workers(service_factory, mongo_url)
    for _ in range(30):
        assert fresh_connection_get(service.url, "/health").status_code == 200
    text = fresh_connection_get(service.url, "/metrics").text
    line = next(
        row
        for row in text.splitlines()
        if row.startswith("http_requests_total{") and 'route="/health"' in row
    )
    assert float(line.rsplit(" ", 1)[1]) == 30
    pids = {row for row in service.output if "Started server process" in row}
    assert len(pids) == 2


# --- moving data ------------------------------------------------------------------------------


def test_a_task_waits_for_a_slow_mongodb_and_stops_with_one_line_when_it_is_away(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """A service answers 503 while it makes MongoDB's indexes in the background; a task has
    nothing to answer meanwhile, so it waits for them within MONGO_TIMEOUT_MS, and gives up
    with one line only when MongoDB does not answer in that time."""
    proxy, url = proxied_mongo
    env = {"DATABASE_URL": url, "API_KEYS": KEY, "MONGO_TIMEOUT_MS": "500"}
    away = run_main(env, "seed")
    assert away.returncode == 1
    last_line = away.stderr.decode().splitlines()[-1]
    assert last_line == "error: Cannot reach MongoDB; try again shortly."

    def slow_index_builds(message: bytes) -> Fate:
        if b"createIndexes" in message:
            time.sleep(mongo_store.FIRST_CONTACT_SECONDS / 4)  # the fault: a slow server
        return "deliver"

    proxy.fault = slow_index_builds
    proxy.start()
    env["MONGO_TIMEOUT_MS"] = "5000"
    seeded = run_main(env, "seed")
    assert seeded.returncode == 0, seeded.stderr
    assert len(run_main(env, "export").stdout.splitlines()) == 10


@pytest.mark.parametrize("task", [(), ("seed",)], ids=["service", "task"])
@pytest.mark.parametrize("url", ["srv", "tls"], ids=["an SRV name DNS does not know", "no CA"])
def test_a_mongodb_url_the_driver_cannot_use_stops_the_start_with_one_line(
    tmp_path: Path, task: tuple[str, ...], url: str
) -> None:
    not_a_certificate = tmp_path / "ca.pem"
    not_a_certificate.write_text("not a certificate\n")
    env = {
        "DATABASE_URL": "mongodb+srv://ada:s3cret-pw@nosuchhost.invalid/d"
        if url == "srv"
        else f"mongodb://ada:s3cret-pw@127.0.0.1:1/d?tls=true&tlsCAFile={not_a_certificate}",
        "API_KEYS": KEY,
        "MONGO_TIMEOUT_MS": "2000",
        "DATA_DIR": str(tmp_path),
        "PORT": str(free_port()),
    }
    stopped = run_main(env, *task, timeout=60)
    output = (stopped.stdout + stopped.stderr).decode()
    assert stopped.returncode == (1 if task else 3), output
    assert "Traceback" not in output
    assert "s3cret-pw" not in output
    assert len([line for line in output.splitlines() if "cannot use DATABASE_URL" in line]) == 1


def test_document_bodies_stay_out_of_the_log_at_debug_on_mongodb(
    mongo_url: str, tmp_path: Path
) -> None:
    """pymongo logs each command with its documents at DEBUG."""
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        with mongo_app_client(mongo_url, tmp_path) as client:
            created = client.post("/v1/documents", json={"title": "t", "content": "secret body"})
            assert created.status_code == 201
    finally:
        configure_logging("INFO")
    assert "document.created" in stream.getvalue()
    assert "secret body" not in stream.getvalue()


def test_a_mongodb_srv_name_is_looked_up_at_first_contact_not_as_the_store_is_built() -> None:
    """Reading the URL's database with pymongo's parse_uri resolved a mongodb+srv:// name with
    blocking DNS calls on the event loop; the client looks it up with dnspython's asyncio
    resolver at first contact, and what DNS says is the store's one error."""

    url = "mongodb+srv://ada:s3cret-pw@nosuchhost.invalid/d"

    async def first_contact() -> None:
        await MongoStore(url).close()  # built on the event loop, without asking DNS
        with pytest.raises(StoreError, match=r"cannot use DATABASE_URL: .*nosuchhost") as got:
            await MongoStore.open(url, timeout_ms=2000, serving=False)
        assert "s3cret-pw" not in str(got.value)

    anyio.run(first_contact)


def test_an_import_into_a_slow_mongodb_takes_longer_and_fails_nothing(
    proxied_mongo: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """Each insert takes 1.2 s of a 3 s limit: an import of 300 documents queued most of them
    for one of the driver's 100 connections, and the wait ran their time out."""
    proxy, url = proxied_mongo

    def slow_inserts(message: bytes) -> Fate:
        if _command(message) == "insert" and b"documents" in message:
            time.sleep(1.2)  # the fault: a slow server
        return "deliver"

    lines = tmp_path / "docs.jsonl"
    doc = {"title": "t", "content": "c", "tags": [], "metadata": {}, "version": 1}
    at = "2025-01-01T00:00:00.000000Z"
    lines.write_text(
        "".join(
            json.dumps({"id": f"01J{n:023d}", **doc, "created_at": at, "updated_at": at}) + "\n"
            for n in range(300)
        )
    )
    proxy.start()
    proxy.fault = slow_inserts
    env = {"DATABASE_URL": url, "API_KEYS": KEY, "MONGO_TIMEOUT_MS": "3000"}
    imported = run_main(env, "import", str(lines))
    assert imported.returncode == 0, imported.stderr
    proxy.fault = None
    assert len(run_main(env, "export").stdout.splitlines()) == 300


def test_sqlite_to_mongodb_and_back_gives_identical_documents(
    mongo_url: str, tmp_path: Path
) -> None:
    embedded = {"DATA_DIR": str(tmp_path / "data"), "API_KEYS": KEY}
    mongodb = {"DATABASE_URL": mongo_url, "API_KEYS": KEY}
    assert run_main(embedded, "seed").returncode == 0
    with app_client(tmp_path / "data", headers={"X-API-Key": KEY}) as c:
        doc = c.post("/v1/documents", json={**DOC, "metadata": {"a.b": 1.5}}).json()
        c.patch(f"/v1/documents/{doc['id']}", json={"content": "v2"})
    first = run_main(embedded, "export").stdout
    backup = tmp_path / "backup.jsonl"
    backup.write_bytes(first)
    for _ in range(2):  # idempotent: the second import adds nothing
        imported = run_main(mongodb, "import", str(backup))
        assert imported.returncode == 0, imported.stderr
    second = run_main(mongodb, "export").stdout
    assert second == first
    assert len(first.splitlines()) == 11
