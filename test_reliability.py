"""Reliability, proven: crash loops, damaged files, hostile input, and a stateful model check."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import KEY, Service, ServiceFactory, walk, write_until_killed
from models import DocumentCreate, DocumentQuery, DocumentUpdate, words
from mongo_store import MongoStore
from sqlite_files import DATABASE_FILE
from sqlite_store import SQLiteStore
from storage import (
    DocumentNotFound,
    DocumentStore,
    PreconditionFailed,
    StoreCorrupt,
)

# --- crash loop -------------------------------------------------------------------------------


def test_twenty_kill_9_rounds_lose_no_acknowledged_write(service_factory: ServiceFactory) -> None:
    rng = random.Random(20261127)
    service = service_factory()
    everything: dict[str, Any] = {}
    for _ in range(20):
        service.start()
        with service.client() as client:
            for doc_id, doc in everything.items():
                assert client.get(f"/v1/documents/{doc_id}").json() == doc
        sizes = functools.partial(rng.randint, 1, 2000)
        everything.update(write_until_killed(service, rng.randint(5, 80), sizes))
    service.start()
    with service.client() as client:
        listed = [d["id"] for d in walk(client, limit=100)]
    assert set(everything) <= set(listed)
    assert len(listed) == len(set(listed))


@pytest.fixture
def data_file(tmp_path: Path) -> bytes:
    async def fill() -> None:
        store = SQLiteStore.open(tmp_path)
        for i in range(30):
            await store.create(DocumentCreate(title=f"d{i}", content="c" * 50, tags=["t"]))
        await store.close()

    anyio.run(fill)
    return (tmp_path / DATABASE_FILE).read_bytes()


@pytest.mark.parametrize("twentieth", range(20))
def test_data_file_truncated_at_each_twentieth_is_refused_untouched(
    tmp_path: Path, data_file: bytes, twentieth: int
) -> None:
    damaged = data_file[: len(data_file) * twentieth // 20]
    (tmp_path / DATABASE_FILE).write_bytes(damaged)
    with pytest.raises(StoreCorrupt, match="truncated"):
        SQLiteStore.open(tmp_path)
    assert (tmp_path / DATABASE_FILE).read_bytes() == damaged


def test_data_file_of_garbage_is_refused_untouched(tmp_path: Path, data_file: bytes) -> None:
    garbage = random.Random(7).randbytes(len(data_file))
    (tmp_path / DATABASE_FILE).write_bytes(garbage)
    with pytest.raises(StoreCorrupt, match="not an SQLite database"):
        SQLiteStore.open(tmp_path)
    assert (tmp_path / DATABASE_FILE).read_bytes() == garbage


# --- hostile input ----------------------------------------------------------------------------


def raw_request(service: Service, head: bytes, body: bytes) -> bytes:
    """Send bytes as they are (no client library fixing them up) and read the status line."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may refuse the rest once it answered
            sock.sendall(body)
        return sock.recv(65536)


MB = 1024 * 1024
JSON = {"X-API-Key": KEY, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, int]]:
    """One server for the whole catalogue, and its RSS once warmed up."""
    service = Service(tmp_path_factory.mktemp("hostile") / "data").start()
    with service.client() as client:
        client.get("/v1/documents")
    yield service, service.rss_kb()
    service.stop_quietly()


def fifty_megabytes() -> Iterator[bytes]:
    for _ in range(50):
        yield b"x" * MB


def big_json(**fields: Any) -> bytes:
    return httpx.Request("POST", "/", json={"title": "t", "content": "x", **fields}).content


POST_BODIES: list[tuple[str, Any, int]] = [
    ("JSON nested 100 000 deep", b"[" * 100_000 + b"]" * 100_000, 400),
    ("invalid UTF-8", b'{"title": "\xff\xfe", "content": "x"}', 400),
    ("raw NUL byte", b'{"title": "a\x00b", "content": "x"}', 400),
    ("escaped NUL in the title", b'{"title": "a\\u0000b", "content": "x"}', 422),
    ("10 000 tags", big_json(tags=[f"t{i}" for i in range(10_000)]), 400),
    ("10 000 metadata keys", big_json(metadata={f"k{i}": i for i in range(10_000)}), 400),
    ("21 tags", big_json(tags=[f"t{i}" for i in range(21)]), 422),
    ("51 metadata keys", big_json(metadata={f"k{i}": i for i in range(51)}), 422),
    ("number 1e999", b'{"title": "t", "content": "x", "metadata": {"n": 1e999}}', 400),
    ("duplicate keys", b'{"title": "t", "title": "u", "content": "x"}', 400),
    ("50 MB chunked, no Content-Length", fifty_megabytes, 413),
]


@pytest.mark.parametrize(
    ("body", "status"), [c[1:] for c in POST_BODIES], ids=[c[0] for c in POST_BODIES]
)
def test_hostile_body_gets_a_4xx_problem(
    hostile_target: tuple[Service, int], body: Any, status: int
) -> None:
    service, _ = hostile_target
    with httpx.Client(base_url=service.url, headers=JSON, timeout=30) as client:
        response = client.post("/v1/documents", content=body() if callable(body) else body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"


def test_50_mb_body_with_content_length_is_refused_before_it_arrives(
    hostile_target: tuple[Service, int],
) -> None:
    service, _ = hostile_target
    head = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {50 * MB}\r\n\r\n"
    ).encode()
    assert raw_request(service, head, b"x" * MB).split(b" ")[1] == b"413"


@pytest.mark.parametrize(
    "path", ["/v1/documents/..%5C..%5Cetc%5Cpasswd", "/v1/documents/%00", "/v1/documents/a%0Ab%22c"]
)
def test_hostile_ids_get_404(hostile_target: tuple[Service, int], path: str) -> None:
    service, _ = hostile_target
    with service.client() as client:
        assert client.get(path).status_code == 404


@pytest.mark.parametrize("cursor", ["eyJ4Ijo.AAAA", "%%%", "a" * 512])
def test_tampered_cursors_get_400(hostile_target: tuple[Service, int], cursor: str) -> None:
    service, _ = hostile_target
    with service.client() as client:
        assert client.get("/v1/documents", params={"cursor": cursor}).status_code == 400


def test_quotes_and_newlines_in_headers_and_paths_keep_one_json_object_per_line(
    hostile_target: tuple[Service, int],
) -> None:
    service, _ = hostile_target
    with service.client() as client:
        client.get("/health", headers={"X-Request-ID": 'a"b', "User-Agent": 'x"\\y{}'})
        client.get("/v1/documents/%0A%7B%22level%22%3A%22CRITICAL%22%7D")
    lines = [line for line in "".join(service.output).splitlines() if line.strip()]
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_a_thousand_idempotency_keys_from_one_client(hostile_target: tuple[Service, int]) -> None:
    service, _ = hostile_target
    with service.client() as client:
        for i in range(1000):
            response = client.post(
                "/v1/documents",
                json={"title": "t", "content": "x"},
                headers={"Idempotency-Key": f"k{i}"},
            )
            assert response.status_code == 201


def test_the_catalogue_leaves_the_process_up_and_its_memory_near_baseline(
    hostile_target: tuple[Service, int],
) -> None:
    """Every hostile body again, then the process: bodies are refused, not buffered, so memory
    does not follow them."""
    service, _ = hostile_target
    baseline = service.rss_kb()
    with httpx.Client(base_url=service.url, headers=JSON, timeout=30) as client:
        for _, body, status in POST_BODIES:
            response = client.post("/v1/documents", content=body() if callable(body) else body)
            assert response.status_code == status
    assert service.proc is not None
    assert service.proc.poll() is None
    with service.client() as client:
        assert client.get("/health/ready").status_code == 200
    assert service.rss_kb() - baseline < 40 * 1024


# --- stateful model check ---------------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Random create/patch/delete/get/list sequences against a plain dict of expected documents."""

    backend = "sqlite"
    mongo_uri = ""
    docs = Bundle("docs")
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.tmp = Path(self.runner.run(anyio.to_thread.run_sync(_mkdtemp)))
        self.store: DocumentStore = self.runner.run(self._open())
        self.model: dict[str, dict[str, Any]] = {}

    async def _open(self) -> DocumentStore:
        if self.backend == "sqlite":
            return SQLiteStore.open(self.tmp)
        return await MongoStore.open(f"{self.mongo_uri}sm_{next(self.counter)}", serving=False)

    def teardown(self) -> None:
        self.runner.run(self.store.close())
        self.runner.close()
        shutil.rmtree(self.tmp)  # one directory per example: a run leaves none behind

    @staticmethod
    def _fields(doc: Any) -> dict[str, Any]:
        return {k: getattr(doc, k) for k in ("title", "content", "tags", "metadata", "version")}

    @rule(
        target=docs,
        title=st.text("abc ", min_size=1, max_size=5).filter(str.strip),
        tags=st.lists(st.sampled_from(["x", "y", "z"]), max_size=2),
    )
    def create(self, title: str, tags: list[str]) -> str:
        doc, _ = self.runner.run(
            self.store.create(DocumentCreate(title=title, content="c", tags=tags))
        )
        self.model[doc.id] = self._fields(doc)
        return doc.id

    @rule(
        doc_id=docs,
        title=st.sampled_from(["p", "q"]),
        use_if_match=st.booleans(),
        stale=st.booleans(),
    )
    def patch(self, doc_id: str, title: str, use_if_match: bool, stale: bool) -> None:
        expected = self.model.get(doc_id)
        version = (expected["version"] - (1 if stale else 0)) if expected else 1
        try:
            doc = self.runner.run(
                self.store.update(
                    doc_id,
                    DocumentUpdate(title=title),
                    if_version=version if use_if_match else None,
                )
            )
        except DocumentNotFound:
            assert expected is None
            return
        except PreconditionFailed:
            assert expected is not None
            assert use_if_match
            assert stale
            return
        assert expected is not None
        assert not (use_if_match and stale)
        if title != expected["title"]:
            expected.update(title=title, version=expected["version"] + 1)
        assert self._fields(doc) == expected

    @rule(doc_id=consumes(docs), use_if_match=st.booleans())
    def delete(self, doc_id: str, use_if_match: bool) -> None:
        expected = self.model.pop(doc_id, None)
        try:
            self.runner.run(
                self.store.delete(
                    doc_id, if_version=expected["version"] if expected and use_if_match else None
                )
            )
        except DocumentNotFound:
            assert expected is None
            return
        assert expected is not None

    @rule(doc_id=docs)
    def get(self, doc_id: str) -> None:
        try:
            doc = self.runner.run(self.store.get(doc_id))
        except DocumentNotFound:
            assert doc_id not in self.model
            return
        assert self._fields(doc) == self.model[doc_id]

    @invariant()
    def every_page_walk_returns_each_live_match_once(self) -> None:
        for limit, tag, word in (
            (1, None, None),
            (3, None, None),
            (100, None, None),
            (2, "x", None),
            (2, None, "p"),
            (2, "y", "a"),
        ):
            query = DocumentQuery.model_validate({"tag": [tag] if tag else [], "q": word})
            seen: list[str] = []
            after = None
            while True:
                items, after = self.runner.run(self.store.page(query, limit=limit, after=after))
                seen += [d.id for d in items]
                if after is None:
                    break
            live = [
                i
                for i, d in self.model.items()
                if (tag is None or tag in d["tags"]) and (word is None or word in words(d["title"]))
            ]
            assert seen == sorted(live, reverse=True)


def _mkdtemp() -> str:
    return tempfile.mkdtemp(prefix="store-machine-")


@pytest.mark.parametrize("backend", ["sqlite", "mongodb"])
def test_store_agrees_with_a_model_under_random_operations(backend: str, mongo_server: Any) -> None:
    machine = type(
        f"{backend}Machine", (StoreMachine,), {"backend": backend, "mongo_uri": mongo_server.uri}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
