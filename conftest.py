"""Shared fixtures: the real app on a temp dir, and the real service as a subprocess."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import bson
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from secantus import SecantusDBServer

import cursors
from config import Settings
from main import create_app, open_store
from models import Document, DocumentQuery
from sqlite_store import SLOTS, SQLiteStore
from storage import IdGenerator

KEY = "test-key-0001"
OTHER_KEY = "test-key-0002"
HERE = Path(__file__).parent


# The Debian package each tool comes in.
PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus", "chromium": "chromium"}
# Whether this run is `pytest --fast` (make test-fast); set once the options are read.
fast = False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="the inner loop: skip each test that starts a process (service, tool, browser)",
    )


def pytest_configure(config: pytest.Config) -> None:
    global fast  # read by helpers that have no request to ask
    fast = config.getoption("fast")


def starts_a_process() -> None:
    """Every test that starts a process comes through here (Service, run_main, require_tool),
    so --fast skips it without a list to keep."""
    if fast:
        pytest.skip("starts a process (not in --fast)")


def require_tool(path: str) -> str:
    """Tools from Debian packages that .ci/run installs; a bare laptop skips, CI never does.
    An environment variable named like the tool (CHROMIUM=...) points at another build."""
    starts_a_process()
    found = os.environ.get(path.upper()) or shutil.which(path)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: .ci/run must install it")
        package = PACKAGES.get(path, path)
        pytest.skip(f"{path} is not installed (`apt-get install {package}`, as .ci/run does)")
    return found


def make_settings(data_dir: Path | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_keys": f"alice:{KEY},bob:{OTHER_KEY}",
        "rate_limit": "10000/minute",
        "keyless_rate_limit": "10000/minute",
    }
    values.update(overrides)
    # _env_file=None: a developer's .env must not change what the tests see.
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["type"].startswith("urn:")
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return body


def walk(client: httpx.Client | TestClient, **params: Any) -> list[dict[str, Any]]:
    """Every document of a listing, following `next_cursor` to the last page."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/documents", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def minted_cursor(at: Any, doc_id: Any, secret: bytes) -> str:
    """A cursor for the plain listing, signed with `secret`, holding any values at all."""
    payload = base64.urlsafe_b64encode(
        json.dumps([cursors._query_digest(DocumentQuery().binding), at, doc_id]).encode()
    ).rstrip(b"=")
    return (payload + b"." + cursors._signature(payload, secret)).decode()


OUT_OF_RANGE = [
    (10**15, "0" * 26),
    (-(10**15), "0" * 26),
    (2**70, "0" * 26),
    (1.5, "0" * 26),
    (0, "not-an-id"),
    (0, 12),
    (0, "0" * 27),
]


def cursor_values_out_of_range(client: TestClient) -> None:
    """Even a cursor signed with the data set's own secret holds only positions a listing
    can have: anything else is 400, never 500."""
    assert client.post("/v1/documents", json={"title": "t", "content": "c"}).status_code == 201
    app: FastAPI = client.app  # type: ignore[assignment]  # TestClient types it as any ASGI app
    assert client.portal is not None  # inside `with`
    secret: bytes = client.portal.call(app.state.store.cursor_secret)
    for at, doc_id in OUT_OF_RANGE:
        minted = minted_cursor(at, doc_id, secret)
        assert_problem(client.get("/v1/documents", params={"cursor": minted}), 400)
    assert client.get(
        "/v1/documents", params={"cursor": minted_cursor(0, "0" * 26, secret)}
    ).json() == {
        "items": [],
        "next_cursor": None,
    }


# A listing that matches sparsely: on documents seed_common makes, every one matches `q` and
# the first tag, none the rest, so the store walks every match of the first filter to find none.
SPARSE: dict[str, str | int | list[str]] = {
    "q": "common",
    "tag": ["common", "nomatch"],
    "metadata.s": "x",
    "metadata.t": "nomatch",
    "sort": "updated_at",
    "limit": 1,
}


def plain_document(doc_id: str, at: datetime, version: int = 1) -> Document:
    """A document as a store keeps it, titled "t", with nothing but `doc_id`, `at` (its creation
    and its last change) and `version` to tell it apart."""
    return Document(
        id=doc_id,
        title="t",
        content="c",
        tags=[],
        metadata={},
        created_at=at,
        updated_at=at,
        version=version,
    )


async def fill_millisecond(store: SQLiteStore, at: datetime) -> list[Document]:
    """As many documents of the millisecond `at` as the embedded store holds (16 384), imported
    in random id order."""
    docs = [plain_document(IdGenerator()(at), at) for _ in range(SLOTS)]
    assert await store.import_documents(docs) == len(docs)
    return docs


async def seed_common(settings: Settings, count: int) -> None:
    """`count` documents alike but for their ids and times, imported into the settings' store."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    store = await open_store(settings, serving=False)
    try:
        for start in range(0, count, 512):
            batch = [
                Document(
                    id=f"01J{n:023d}",
                    title="common",
                    content="c",
                    tags=["common"],
                    metadata={"s": "x"},
                    created_at=at + timedelta(milliseconds=n),
                    updated_at=at + timedelta(milliseconds=n),
                    version=1,
                )
                for n in range(start, min(count, start + 512))
            ]
            await store.import_documents(batch)
    finally:
        await store.close()


def scrape(
    client: httpx.Client | TestClient, headers: dict[str, str] | None = None
) -> dict[str, Metric]:
    """/metrics, parsed: each metric family by name (a counter's without `_total`)."""
    text = client.get("/metrics", headers=headers).text
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecantusDBServer]:
    """A real MongoDB wire-protocol server (SecantusDB) on a free port, for the whole session."""
    server = SecantusDBServer(port=0, storage_path=str(tmp_path_factory.mktemp("mongo")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def standalone_mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecantusDBServer]:
    """The same, as a standalone server (no replica set: no transactions, no retried writes)."""
    server = SecantusDBServer(
        port=0, storage_path=str(tmp_path_factory.mktemp("standalone")), replica_set_name=None
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mongo_url(mongo_server: SecantusDBServer, request: pytest.FixtureRequest) -> str:
    """A database of its own for each test."""
    name = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]  # noqa: S324
    return f"{mongo_server.uri}{name}"


# What a relay does with one client message: pass it on, cut the connection instead, or pass it
# on and cut the connection before its reply comes back (the command ran; the client never hears).
OP_MSG = 2013  # the wire protocol's message kind for commands
# An int answers the message with that MongoDB error code instead.
Fate = Literal["deliver", "cut", "drop reply", "time limit"] | int


class TcpProxy:
    """A loopback TCP relay in front of a MongoDB wire-protocol server; stopping it is a network
    outage that the test controls (listener closed, every open connection cut). It relays whole
    wire messages, so a test decides each client message's fate: `fault(message)` runs in the
    relay's thread before the message is passed on and may block there, which holds that
    message (and its connection) back while other connections go on; "time limit" answers it
    as MongoDB answers a command it stopped at its maxTimeMS, which the test server does not.
    `cut_when` is the older shorthand for a fault that cuts every message it matches; while
    `black_hole` is set, client messages are swallowed: no answer ever. `replied` counts the
    bytes of the replies passed back. Another protocol (Redis) is relayed as it comes, with
    `wire=False`: then a message is whatever one read returns."""

    def __init__(self, target: tuple[str, int], *, wire: bool = True) -> None:
        self.target = target
        self._read = _read_message if wire else lambda sock: sock.recv(65536)
        self.cut_when: Callable[[bytes], bool] | None = None
        self.fault: Callable[[bytes], Fate] | None = None
        self.black_hole = False
        self.replied = 0
        # Bound now, listening from start(): no other process can take the port in between.
        self._listener: socket.socket | None = self._bind(0)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _bind(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        return listener

    def start(self) -> None:
        listener = self._listener or self._bind(self.port)  # after a stop, the same port again
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            drop_reply = threading.Event()  # set: the next reply on this connection is lost
            threading.Thread(
                target=self._outbound, args=(client, upstream, drop_reply), daemon=True
            ).start()
            threading.Thread(
                target=self._inbound, args=(upstream, client, drop_reply), daemon=True
            ).start()

    def _fate(self, message: bytes) -> Fate:
        cut_when, fault = self.cut_when, self.fault
        if cut_when is not None and cut_when(message):
            return "cut"
        return fault(message) if fault is not None else "deliver"

    def _outbound(
        self, client: socket.socket, upstream: socket.socket, drop: threading.Event
    ) -> None:
        with _cut_on_exit(client, upstream):
            while message := self._read(client):
                fate = self._fate(message)
                if fate == "cut":
                    return
                if fate == "drop reply":
                    drop.set()
                if fate == "time limit":
                    client.sendall(_error_reply(message, 50, "MaxTimeMSExpired"))
                elif isinstance(fate, int):
                    client.sendall(_error_reply(message, fate, f"Code{fate}"))
                elif not self.black_hole:
                    upstream.sendall(message)

    def _inbound(
        self, upstream: socket.socket, client: socket.socket, drop: threading.Event
    ) -> None:
        with _cut_on_exit(upstream, client):
            while (message := self._read(upstream)) and not drop.is_set():
                client.sendall(message)
                with self._lock:
                    self.replied += len(message)

    def stop(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the accept() blocked in the thread; close() alone would not.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _error_reply(request: bytes, code: int, name: str) -> bytes:
    """An OP_MSG answering `request` with MongoDB's error `code` (50: MaxTimeMSExpired)."""
    error = {"ok": 0.0, "errmsg": f"error {name}", "code": code, "codeName": name}
    payload = bytes(4) + b"\x00" + bson.encode(error)  # no flags; one section, kind 0
    request_id = request[4:8]
    header = (16 + len(payload)).to_bytes(4, "little") + bytes(4) + request_id
    return header + OP_MSG.to_bytes(4, "little") + payload


def _read_message(sock: socket.socket) -> bytes:
    """One whole wire message (its first four bytes are its length), or b"" at the end."""
    data = b""
    need = 4
    while len(data) < need:
        chunk = sock.recv(need - len(data))
        if not chunk:
            return b""
        data += chunk
        if len(data) == 4:
            need = int.from_bytes(data, "little")
    return data


@contextlib.contextmanager
def _cut_on_exit(*sockets: socket.socket) -> Iterator[None]:
    """However a relay thread ends, both ends of its connection are cut."""
    try:
        yield
    except OSError:
        pass
    finally:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def app_client(
    data_dir: Path, *, headers: dict[str, str] | None = None, **settings: Any
) -> TestClient:
    """The real app on `data_dir` with test settings; `with` runs its lifespan."""
    return TestClient(create_app(make_settings(data_dir, **settings)), headers=headers)


def until_ready(client: httpx.Client | TestClient, seconds: float = 15) -> None:
    """The driver rediscovers a returning server on its own heartbeat: poll readiness (each
    poll is a request a load balancer would make), never a fixed sleep."""
    deadline = time.monotonic() + seconds
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "did not recover"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path, headers={"X-API-Key": KEY}) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_main(
    env: dict[str, str], *args: str, timeout: float = 120, python: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`python main.py ARGS` with only PATH and `env` in its environment; or `python -c
    PYTHON ARGS`, a script that runs main.py itself."""
    starts_a_process()
    program = ["-c", python] if python is not None else [str(HERE / "main.py")]
    return subprocess.run(
        [sys.executable, *program, *args],
        cwd=HERE,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        timeout=timeout,
        check=False,
    )


class Service:
    """`python main.py` in a subprocess, as a user starts it."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, wrapper: list[str] | None = None
    ) -> None:
        """`wrapper` runs before the interpreter (say, `setpriv ...` to drop privileges)."""
        starts_a_process()
        self.data_dir = data_dir
        self.wrapper = wrapper or []
        self.port = free_port()
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "API_KEYS": f"alice:{KEY}",
            "DATA_DIR": str(data_dir),
            "PORT": str(self.port),
            "RATE_LIMIT": "1000000/minute",
            "KEYLESS_RATE_LIMIT": "1000000/minute",
            "LOG_LEVEL": "INFO",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []
        self._changed = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> Service:
        self.output = []
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, str(HERE / "main.py")],
            cwd=HERE,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # A group of its own: several workers (and their helpers) are stopped together.
            start_new_session=True,
        )
        self.follow()
        if wait:
            # `python main.py` listens before the app starts: once it has, connections are served.
            self.wait_for_line("Application startup complete", timeout=20)
        return self

    def follow(self) -> None:
        """Drain the output continuously (a full pipe would stall the server)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def drain() -> None:
            for raw in stdout:
                with self._changed:
                    self.output.append(raw.decode(errors="replace"))
                    self._changed.notify_all()
            with self._changed:
                self._eof = True
                self._changed.notify_all()

        previous = getattr(self, "_reader", None)
        if previous is not None:
            previous.join(10)  # its end-of-output must not be taken for this process's
        self._eof = False
        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def wait_for_line(self, text: str, timeout: float, count: int = 1) -> str:
        """Block until the service prints `count` lines containing `text` (say, one per
        worker): the process tells us it is ready, no sleeping and hoping."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: self._eof or sum(text in line for line in self.output) >= count, timeout
            )
            matches = [line for line in self.output if text in line]
        if not found or len(matches) < count:
            raise AssertionError(f"no line with {text!r}; output:\n{''.join(self.output)}")
        return matches[0]

    def rest_of_output(self, timeout: float = 10) -> str:
        assert self.proc is not None
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return "".join(self.output)

    def rss_kb(self) -> int:
        """The server process's resident memory."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1])

    def client(self, key: str = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": key}, timeout=10)

    def terminate(self, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9, of every process the service started too."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop_quietly(self) -> None:
        """SIGTERM first, so the service cleans up after itself, then the whole group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.kill()


ServiceFactory = Callable[..., Service]


def run_threads(target: Callable[[int], None], count: int = 8) -> None:
    """Run target(0) ... target(count - 1) at once and wait for all of them."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def write_until_killed(
    service: Service, target: int, content_size: Callable[[], int] = lambda: 200
) -> dict[str, Any]:
    """Eight clients create documents until `target` are acknowledged, then the server gets
    kill -9 mid-stream. Returns every acknowledged document; anything but 201 fails the test."""
    acknowledged: dict[str, Any] = {}
    refused: list[int] = []
    lock = threading.Lock()
    enough = threading.Event()

    def writer(n: int) -> None:
        with service.client() as client:
            for i in itertools.count():
                body = {"title": f"w{n}-{i}", "content": "x" * content_size(), "tags": [f"t{n}"]}
                try:
                    response = client.post("/v1/documents", json=body)
                except httpx.HTTPError:
                    return  # the server is gone: this write was never acknowledged
                with lock:
                    if response.status_code != 201:
                        refused.append(response.status_code)
                        enough.set()
                        return
                    acknowledged[response.json()["id"]] = response.json()
                    if len(acknowledged) >= target:
                        enough.set()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    assert enough.wait(60)
    service.kill()
    for thread in threads:
        thread.join(30)
    assert refused == []
    return acknowledged


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[ServiceFactory]:
    started: list[Service] = []

    def make(
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
    ) -> Service:
        service = Service(data_dir or tmp_path / "data", env, wrapper)
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop_quietly()
